"""TFDS as the image store of the split lists (`dataset.source='tfds'`).

The lists still define the training set and the test set; TFDS only holds the
image bytes. Each list entry is matched by file name to one record of a TFDS
split, and records are read by index through TFDS's random-access API
(`tfds.data_source`, ArrayRecord files), which the class-aware sampler needs.

| dataset.name | TFDS dataset       | list entry -> TFDS split                      | matched on |
|--------------|--------------------|-----------------------------------------------|------------|
| imagenet_lt  | imagenet2012       | `train/...` -> train, `val/...` -> validation | `file_name` = the entry's base name |
| inat2018     | i_naturalist2018   | train list -> train, val list -> validation   | `id` = base name without extension |

What the user prepares (docs/data.md): the dataset built in ArrayRecord
format, e.g. `tfds build imagenet2012 --manual_dir=DIR --file_format=array_record
--data_dir=TFDS_DIR`, and `dataset.tfds_data_dir=TFDS_DIR`. Matching needs the
name and label of every record of a split; reading them reads the image bytes
too (minutes for ImageNet), so the result is built once and kept
(`index_path`: the TFDS data directory, or `dataset.cache_dir`).
"""

import dataclasses
import io
import logging
import os

import numpy as np

from lt_calib import storage
from lt_calib.data import lists
from lt_calib.errors import DataError, MissingDataError, MissingDependencyError, UserError

# Record key = split code << SPLIT_SHIFT | record index, one int64 per row.
SPLIT_SHIFT = 40
_SCAN_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class TfdsLayout:
  """How the entries of a dataset's lists map onto a TFDS dataset."""
  tfds_name: str
  name_feature: str       # Feature holding the file name.
  strip_extension: bool   # Whether that feature lacks the file extension.
  by_prefix: dict         # First path component -> TFDS split ({} = by list role).
  by_role: dict           # List role ('train', 'test', 'val') -> TFDS split.


TFDS_LAYOUTS = {
    "imagenet_lt": TfdsLayout("imagenet2012", "file_name", False,
                              {"train": "train", "val": "validation"}, {}),
    "inat2018": TfdsLayout("i_naturalist2018", "id", True, {},
                           {"train": "train", "test": "validation"}),
}


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError("dataset.source='tfds' needs tensorflow-datasets: "
                                 "pip install -e '.[tfds]'.") from e
  return tfds


def record_key(name: bytes, strip_extension: bool) -> bytes:
  """The TFDS name of a list entry: its base name (without extension for iNat)."""
  base = name.rsplit(b"/", 1)[-1]
  return base.split(b".", 1)[0] if strip_extension else base


def entry_splits(layout: TfdsLayout, role: str, image_list: lists.ImageList) -> np.ndarray:
  """TFDS split name of every entry of a list (object array)."""
  if layout.by_role:
    if role not in layout.by_role:
      raise DataError(f"{image_list.path}: no TFDS split holds the {role!r} list of "
                      f"{layout.tfds_name}; use dataset.source='auto' with an image folder.")
    return np.full(len(image_list), layout.by_role[role], dtype=object)
  first = [p.split(b"/", 1)[0].decode() for p in image_list.rel_paths]
  unknown = [k for k, f in enumerate(first) if f not in layout.by_prefix]
  if unknown:
    raise DataError(f"{image_list.where(unknown[0])}: the path must start with one of "
                    f"{sorted(layout.by_prefix)}/ to be found in TFDS {layout.tfds_name}.")
  return np.array([layout.by_prefix[f] for f in first], dtype=object)


def open_split(tfds, layout: TfdsLayout, split: str, data_dir):
  """Random-access data source of one TFDS split, records as raw bytes."""
  try:
    return tfds.data_source(layout.tfds_name, split=split, data_dir=data_dir or None,
                            download=False,
                            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many kinds.
    raise MissingDataError(
        f"TFDS {layout.tfds_name}:{split} cannot be opened for random access from "
        f"dataset.tfds_data_dir={data_dir or '(default)'!r} ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); build it with "
        f"`tfds build {layout.tfds_name} --file_format=array_record --data_dir=DIR` "
        "(see docs/data.md) and set dataset.tfds_data_dir=DIR.") from e


def index_path(cfg, layout: TfdsLayout, split: str, version: str, size: int):
  """Where the record index (names, labels) of one split is kept.

  `dataset.cache_dir` if set, else a folder `lt_calib_index` in the TFDS data
  directory, next to the records it describes: every host of every run finds
  it there (gs:// included), so the ~1.3 M ImageNet records are read once.
  """
  root = (storage.as_path(cfg.cache_dir) if cfg.get("cache_dir")
          else storage.as_path(cfg.get("tfds_data_dir") or _tfds().core.constants.DATA_DIR)
          / "lt_calib_index")
  return root / f"tfds_{layout.tfds_name}_{version}_{split}_{size}_names.npz"


def _read_index(path):
  if not path.exists():
    return None
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as stored:
    return stored["names"], stored["labels"]


def _write_index(path, names, labels) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, names=names, labels=labels)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(path):
      path.write_bytes(buffer.getvalue())
    else:  # Atomic: a concurrent reader never sees half a file.
      tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
      tmp.write_bytes(buffer.getvalue())
      tmp.replace(path)
  except OSError as e:  # A read-only data directory: work without keeping it.
    logging.warning("cannot keep the TFDS record index at %s (%s); set "
                    "dataset.cache_dir to a writable folder.", path, e)


def scan_names(source, layout: TfdsLayout, split: str) -> tuple:
  """(names bytes [R], labels int64 [R]) of every record of a split (slow: reads all)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  size = len(source)
  logging.info("reading the file names of TFDS %s:%s (%d records, once)",
               layout.tfds_name, split, size)
  spec = {layout.name_feature: tf.io.FixedLenFeature([], tf.string),
          "label": tf.io.FixedLenFeature([], tf.int64)}
  names, labels = [], []
  for start in range(0, size, _SCAN_CHUNK):
    keys = list(range(start, min(size, start + _SCAN_CHUNK)))
    # Batched reads where the source has them (ArrayRecord reads in parallel).
    records = (source.__getitems__(keys) if hasattr(source, "__getitems__")
               else [source[k] for k in keys])
    parsed = tf.io.parse_example(tf.constant(list(records)), spec)
    names.append(parsed[layout.name_feature].numpy().astype(np.bytes_))
    labels.append(parsed["label"].numpy())
  names = np.concatenate(names) if names else np.zeros(0, np.bytes_)
  labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
  return names, labels


def record_index(source, layout: TfdsLayout, split: str, path) -> tuple:
  """`scan_names` of a split, built once and kept at `path` (`index_path`).

  On several processes, process 0 builds it while the others wait, then
  they read it (or, if it could not be written, scan themselves).
  """
  stored = _read_index(path)
  if stored is not None:
    return stored
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    names, labels = scan_names(source, layout, split)
    _write_index(path, names, labels)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"lt_calib tfds index {split}")
  if jax.process_index() == 0:
    return names, labels
  return _read_index(path) or scan_names(source, layout, split)


def match(image_list: lists.ImageList, rows: np.ndarray, names: np.ndarray,
          labels: np.ndarray, layout: TfdsLayout, split: str) -> np.ndarray:
  """Record index of each list row in `rows` (all in TFDS split `split`)."""
  order = np.argsort(names, kind="stable")
  sorted_names = names[order]
  wanted = np.array([record_key(p, layout.strip_extension)
                     for p in image_list.rel_paths[rows]], dtype=np.bytes_)
  position = np.clip(np.searchsorted(sorted_names, wanted), 0, max(len(names) - 1, 0))
  found = (sorted_names[position] == wanted) if len(names) else np.zeros(len(rows), bool)
  if not found.all():
    k = rows[np.flatnonzero(~found)[0]]
    raise MissingDataError(
        f"{image_list.where(k)}: no record named {wanted[np.flatnonzero(~found)[0]].decode()!r} "
        f"in TFDS {layout.tfds_name}:{split}; the list and the TFDS data disagree.")
  records = order[position]
  wrong = np.flatnonzero(labels[records] != image_list.labels[rows])
  if wrong.size:
    k = rows[wrong[0]]
    raise DataError(f"{image_list.where(k)}: label {image_list.labels[k]} but TFDS "
                    f"{layout.tfds_name}:{split} says {labels[records[wrong[0]]]}.")
  return records.astype(np.int64)


class TfdsReader:
  """Reads the images of one list from TFDS records (key = split code, record)."""

  key_dtype = "int64"

  def __init__(self, image_list, keys, sources_by_code, split_names, tfds_name):
    self.image_list = image_list
    self._keys = keys
    self._sources = sources_by_code
    self._split_names = split_names
    self._tfds_name = tfds_name

  def keys(self, rows: np.ndarray) -> np.ndarray:
    return self._keys[rows]

  def _fetch(self, key) -> bytes:
    key = int(key)
    return self._sources[key >> SPLIT_SHIFT][key & ((1 << SPLIT_SHIFT) - 1)]

  def read(self, key):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    record = tf.numpy_function(self._fetch, [key], tf.string, stateful=False)
    record.set_shape([])
    return tf.io.parse_single_example(
        record, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]

  def missing(self, row: int):
    del row  # Every entry was matched to a record when the dataset was loaded.
    return None

  def describe(self, row: int) -> str:
    key = int(self._keys[row])
    return (f"{self.image_list.rel_paths[row].decode('utf-8', 'replace')} (TFDS "
            f"{self._tfds_name}:{self._split_names[key >> SPLIT_SHIFT]} record "
            f"{key & ((1 << SPLIT_SHIFT) - 1)}; {self.image_list.path.name} line "
            f"{int(self.image_list.line_numbers[row])})")


def readers(cfg, train_list: lists.ImageList, eval_lists: dict):
  """TfdsReaders of the training and evaluation lists.

  Returns:
    (train reader, {split: reader}, source line, identity entries).
  """
  if cfg.name not in TFDS_LAYOUTS:
    raise DataError(f"dataset.source='tfds' is not available for dataset.name={cfg.name!r}; "
                    f"allowed: {sorted(TFDS_LAYOUTS)}.")
  tfds = _tfds()
  layout = TFDS_LAYOUTS[cfg.name]
  data_dir = cfg.get("tfds_data_dir") or None
  version = str(tfds.builder(layout.tfds_name, data_dir=data_dir).version)
  roles = [("train", train_list), *eval_lists.items()]
  splits_of = {role: entry_splits(layout, role, l) for role, l in roles}
  split_names = sorted({s for v in splits_of.values() for s in v})
  sources_by_code, scanned = {}, {}
  for code, split in enumerate(split_names):
    sources_by_code[code] = open_split(tfds, layout, split, data_dir)
    source = sources_by_code[code]
    scanned[split] = record_index(source, layout, split,
                                  index_path(cfg, layout, split, version, len(source)))
  built = {}
  for role, image_list in roles:
    keys = np.zeros(len(image_list), np.int64)
    for code, split in enumerate(split_names):
      rows = np.flatnonzero(splits_of[role] == split)
      if rows.size:
        keys[rows] = (code << SPLIT_SHIFT) | match(image_list, rows, *scanned[split],
                                                   layout, split)
    built[role] = TfdsReader(image_list, keys, sources_by_code, split_names,
                             layout.tfds_name)
  identity = {"tfds_name": layout.tfds_name, "tfds_version": version}
  source = f"tfds:{layout.tfds_name}:{version} lists:{train_list.path.parent}"
  return built.pop("train"), built, source, identity

