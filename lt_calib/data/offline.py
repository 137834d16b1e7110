"""Offline dataset files: `.npz` archives of image bytes, read without a network.

Format (../shared/data/README.md): `train_jpeg`/`test_jpeg` (the image files
back to back), `*_offsets`, `*_labels`, `class_names`. Images are decoded with
Pillow (no TensorFlow) and the decoded arrays cached as plain `.npy` files;
nothing is ever unpickled. Where a dataset's file is looked for:
`dataset.data_file`, `$LT_CALIB_DATA_DIR`, `<repo>/data/`, `../shared/data/`.
"""

import concurrent.futures
import hashlib
import io
import logging
import os
import pathlib
import zipfile
import zlib
from typing import Optional

import numpy as np
from PIL import Image

from lt_calib import storage
from lt_calib.errors import ConfigError, DataError, MissingDataError


def candidate_paths(info, data_file: str = "") -> list:
  """Offline file locations, in the order they are tried."""
  paths = []
  if data_file:
    paths.append(pathlib.Path(data_file).expanduser())
  if info.offline_file:
    if os.environ.get("LT_CALIB_DATA_DIR"):
      paths.append(pathlib.Path(os.environ["LT_CALIB_DATA_DIR"]) / info.offline_file)
    paths.append(storage.REPO_ROOT / "data" / info.offline_file)
    paths.append(storage.SHARED_DATA_DIR / info.offline_file)
  return paths


def find_file(info, data_file: str = "") -> Optional[pathlib.Path]:
  """The first of `candidate_paths` that exists, or None."""
  return next((p for p in candidate_paths(info, data_file) if p.is_file()), None)


NPZ_FORMAT = "../shared/data/README.md"
REQUIRED_ARRAYS = ("train_jpeg", "train_offsets", "train_labels", "test_jpeg",
                   "test_offsets", "test_labels")


def one_line(error) -> str:
  # Library messages may span lines; a UserError message is one line.
  return " ".join(str(error).split())


def missing_data_message(name, paths):
  tried = "; ".join(str(p) for p in paths) or "(no offline file for this dataset)"
  return (f"no offline data file for dataset {name!r}; tried: {tried}. Put the .npz "
          f"file (format: {NPZ_FORMAT}) in one of these places, point "
          "dataset.data_file or $LT_CALIB_DATA_DIR at it, or use "
          "dataset.source='tfds' on a machine with a network.")


def read_npz(path: pathlib.Path) -> dict:
  """Loads an offline archive, never unpickling, with a one-line error if broken.

  Args:
    path: the `.npz` file.

  Returns:
    dict of every array of the archive.

  Raises:
    MissingDataError: `path` does not exist.
    DataError: `path` is not an .npz archive, is truncated or corrupt, holds
      pickled (object) arrays, or lacks one of REQUIRED_ARRAYS.
  """
  path = pathlib.Path(path)
  fix = (f"replace it with a fresh copy (format: {NPZ_FORMAT}) or point "
         "dataset.data_file at another file")
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except FileNotFoundError as e:
    raise MissingDataError(f"offline data file {path} does not exist.") from e
  except OSError as e:
    raise DataError(f"cannot read offline data file {path}: {e.strerror or e}.") from e
  # A zip (so an .npz) opens with a local file header, or the end record if
  # empty; a truncated copy keeps its header but loses the central directory.
  if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
    what = "it is empty" if not magic else "it has no zip header"
    raise DataError(f"{path} is not an .npz archive ({what}); {fix}.")
  try:
    with np.load(path, allow_pickle=False) as archive:
      missing = [k for k in REQUIRED_ARRAYS if k not in archive.files]
      if missing:
        raise DataError(f"{path} lacks the arrays {missing} (it has "
                        f"{sorted(archive.files)}); {fix}.")
      arrays = {}
      for key in archive.files:
        try:
          arrays[key] = archive[key]
        except ValueError as e:
          if "allow_pickle" not in str(e):
            raise
          # Unpickling can run arbitrary code, so object arrays stay unread.
          raise DataError(f"{path} contains pickled (object) data in {key!r}, "
                          f"which lt_calib never loads; {fix}.") from e
      return arrays
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(f"{path} is truncated or corrupt ({one_line(e)}); {fix}.") from e


def check_split(archive: dict, split: str, path) -> None:
  """Raises DataError unless a split's labels, offsets and JPEG bytes agree."""
  labels, offsets = archive[f"{split}_labels"], archive[f"{split}_offsets"]
  size = np.asarray(archive[f"{split}_jpeg"]).nbytes
  ok = (labels.ndim == 1 and offsets.shape == (len(labels) + 1,)
        and np.issubdtype(offsets.dtype, np.integer)
        and (len(labels) == 0 or (offsets[0] >= 0 and offsets[-1] <= size
                                  and np.all(np.diff(offsets) > 0))))
  if not ok:
    raise DataError(
        f"{path}: {split}_offsets (shape {offsets.shape}) does not index "
        f"{len(labels)} {split}_labels images in {split}_jpeg ({size} bytes); the "
        f"file is corrupt or not in the format of {NPZ_FORMAT}.")


def decode_jpegs(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray,
                 image_size: int) -> np.ndarray:
  """Decodes selected JPEGs of a concatenated blob to uint8 RGB [n, H, W, 3]."""
  data = blob.tobytes()

  def decode(i):
    raw = data[offsets[i]:offsets[i + 1]]
    try:
      # convert('RGB'): a few Tiny-ImageNet images are grayscale.
      image = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    except (OSError, SyntaxError) as e:  # What Pillow raises on broken bytes.
      raise DataError(f"image {i} is not a readable JPEG ({type(e).__name__}); the "
                      "file is corrupt: replace it with a fresh copy.") from e
    if image.shape != (image_size, image_size, 3):
      raise DataError(f"image {i} has shape {image.shape}, expected "
                      f"{(image_size, image_size, 3)}: the file holds another "
                      "dataset; check dataset.name and dataset.data_file.")
    return image

  # Pillow releases the GIL while decoding, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
    images = list(pool.map(decode, indices, chunksize=256))
  return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)


def cache_dir(cfg) -> pathlib.Path:
  # Decoded CIFAR-sized arrays are read with np.load: a local folder.
  path = storage.cache_dir(cfg)
  if storage.is_remote(path):
    raise ConfigError(f"dataset.cache_dir={str(path)!r}: decoded in-memory datasets are "
                      "cached on a local disk; give a local folder or '' (the default).")
  return pathlib.Path(path)


def decode_cached(path, archive, split, indices, info, cache_dir):
  """Decodes (or loads from cache) the images `indices` of one split."""
  stat = path.stat()
  key = hashlib.sha1(
      f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{split}".encode()
      + np.ascontiguousarray(indices).tobytes()).hexdigest()[:16]
  cache_file = cache_dir / f"{path.stem}_{split}_{key}.npy"
  if cache_file.exists():
    try:
      return np.load(cache_file, allow_pickle=False)
    except (OSError, ValueError) as e:  # A half-written cache is rebuilt.
      logging.warning("ignoring unreadable cache %s: %s", cache_file, e)
  try:
    images = decode_jpegs(archive[f"{split}_jpeg"], archive[f"{split}_offsets"],
                          indices, info.image_size)
  except DataError as e:
    raise DataError(f"{path}, {split} split: {e}") from e
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npy")
  np.save(tmp, images, allow_pickle=False)
  os.replace(tmp, cache_file)  # Atomic: concurrent runs never read half a file.
  return images


def load_class_names(info, cfg) -> Optional[list]:
  """Class names stored in the offline file (`class_names`), else None."""
  found = find_file(info, cfg.get("data_file", ""))
  if found is None:
    return None
  try:
    with np.load(found, allow_pickle=False) as archive:  # Reads only this key.
      if "class_names" in archive.files:
        return [str(n) for n in archive["class_names"]]
  except (OSError, ValueError, zipfile.BadZipFile):
    pass
  return None
