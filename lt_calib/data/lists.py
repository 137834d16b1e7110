"""Split lists of ImageNet-LT, iNaturalist 2018 and any image folder.

The format is the one of OLTR and classifier-balancing, used by every
ImageNet-LT / iNaturalist code base: one `relative/path label` line per image,
the path relative to an image folder (`dataset.image_root`), the label an
integer in [0, C). Blank lines are ignored; a path may contain spaces (the
label is the last field).

Parsing is a handful of bulk bytes operations (437,513 iNaturalist training
lines in a fraction of a second): paths stay one NumPy bytes array, labels one
int32 array, and only the line numbers of the entries are kept for messages.

Where the files are: `dataset.split_dir` and `dataset.image_root` are local
folders or anything `etils.epath` opens (`gs://bucket/...` on Cloud TPU,
`s3://...`); list files are read through `epath.Path`.

Path existence: in a local image folder, a list of at most
`EXISTENCE_CHECK_MAX_LINES` entries (the ImageNet-LT val/test and iNaturalist
val lists) is checked up front, one `stat` per file; a larger list (the
training lists), and every list of a remote image folder (gs://: one request
per image would be 50,000 round trips for the ImageNet-LT test list), is
checked when an image is read. Either way a missing image stops the run with a
message naming the list, the line and the path.
"""

import dataclasses
import hashlib
import os

from etils import epath
import numpy as np

from lt_calib import storage
from lt_calib.errors import ConfigError, DataError, MissingDataError

# Where this workplace keeps the published val/test lists (not the train lists).
SHARED_SPLIT_DIR = storage.SHARED_DATA_DIR / "splits"
EXISTENCE_CHECK_MAX_LINES = 60_000

_CLASSIFIER_BALANCING = ("github.com/facebookresearch/classifier-balancing (folder data/{sub}/) "
                         "or github.com/zhmiao/OpenLongTailRecognition-OLTR")


@dataclasses.dataclass(frozen=True)
class ListLayout:
  """Where the lists of a dataset are and what they hold.

  Attributes:
    num_classes: C; 0 = read from `dataset.num_classes` (generic image lists).
    train_list: file name of the training list.
    eval_lists: split name -> list file name ('test' is the reported split).
    published: where the list files can be downloaded, for error messages.
    root_hint: what `dataset.image_root` must point at, for error messages.
  """
  num_classes: int
  train_list: str
  eval_lists: dict
  published: str
  root_hint: str


LAYOUTS = {
    # ImageNet-LT (Liu et al. 2019): 115,846 training images, 1280..5 per class;
    # val = 20/class from ImageNet train, test = 50/class from ImageNet val.
    "imagenet_lt": ListLayout(
        1000, "ImageNet_LT_train.txt",
        {"test": "ImageNet_LT_test.txt", "val": "ImageNet_LT_val.txt"},
        _CLASSIFIER_BALANCING.format(sub="ImageNet_LT"),
        "the ImageNet folder holding train/ and val/ (val/ split into class folders)"),
    # iNaturalist 2018: 437,513 training images, 8,142 classes; its official
    # val list (3/class) is the test set of the literature.
    "inat2018": ListLayout(
        8142, "iNaturalist18_train.txt", {"test": "iNaturalist18_val.txt"},
        _CLASSIFIER_BALANCING.format(sub="iNaturalist18"),
        "the iNaturalist 2018 folder holding train_val2018/"),
    # Any folder + lists: names from dataset.train_list / test_list / val_list.
    "image_list": ListLayout(
        0, "", {}, "",
        "the folder that the paths in the lists are relative to"),
}


def _cause(error: BaseException) -> str:
  """'Type: first line' of a file-system error, for one-line messages."""
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _probe(check, path, what: str):
  """`check()` of `path`; a failure to ask (credentials, network) -> one DataError line.

  Args:
    check: a no-argument query of `path` (path.is_file, path.is_dir).
    path: the path queried, named in the message.
    what: what the path is, for the message ('list file', 'dataset.image_root').

  Returns:
    What `check` returns.
  """
  try:
    return check()
  # The backends of remote paths raise OSError, tf.errors.OpError or the
  # errors of google.auth / gcsfs: all mean "cannot tell", none "absent".
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot access {what} {path} ({_cause(e)}); check the path and "
                    "that this host may read it.") from e


@dataclasses.dataclass(frozen=True)
class ImageList:
  """One parsed list file.

  Attributes:
    path: the list file (epath.Path: local or gs://).
    rel_paths: bytes [n] image paths relative to the image folder.
    labels: int32 [n] class indices.
    line_numbers: int32 [n] 1-based line of each entry in the file.
    sha256: hex digest of the file, for resume safety.
  """
  path: epath.Path
  rel_paths: np.ndarray
  labels: np.ndarray
  line_numbers: np.ndarray
  sha256: str

  def __len__(self) -> int:
    return len(self.labels)

  def where(self, row: int) -> str:
    """'<list> line <k> (<path>)' of entry `row`, for error messages."""
    return (f"{self.path} line {int(self.line_numbers[row])} "
            f"({self.rel_paths[row].decode('utf-8', 'replace')})")


def _first_bad_label(path, tokens, line_numbers):
  for token, line in zip(tokens, line_numbers):
    if not token.isdigit():
      return DataError(f"{path} line {line}: label {token.decode('utf-8', 'replace')!r} "
                       "is not a non-negative integer; each line must be "
                       "'relative/path label'.")
  return DataError(f"{path}: a label is not an integer.")


def _split_fast(raw: bytes):
  """(paths, label tokens, line numbers) if every line has 0 or 2 fields, else None.

  One `bytes.split` of the whole file and a vectorised count of the fields of
  each line (a field starts where whitespace ends): no Python object per line
  beyond the fields themselves.
  """
  buf = np.frombuffer(raw, np.uint8)
  space = (buf == 32) | ((buf >= 9) & (buf <= 13))  # What bytes.split splits on.
  starts = ~space
  starts[1:] &= space[:-1]
  newlines = np.flatnonzero(buf == 10)
  per_line = np.bincount(np.searchsorted(newlines, np.flatnonzero(starts)),
                         minlength=len(newlines) + 1)
  if np.any((per_line != 0) & (per_line != 2)):
    return None
  tokens = raw.split()
  line_numbers = (np.flatnonzero(per_line == 2) + 1).astype(np.int32)
  return (np.array(tokens[0::2], dtype=np.bytes_), np.array(tokens[1::2], dtype=np.bytes_),
          line_numbers)


def _split_per_line(path, raw: bytes):
  """The slow path: label = last field of each line, errors name the line."""
  lines = raw.splitlines()
  line_numbers = np.flatnonzero([bool(l.strip()) for l in lines]).astype(np.int32) + 1
  fields = [lines[k - 1].rsplit(None, 1) for k in line_numbers]
  if any(len(f) != 2 for f in fields):
    bad = next(k for f, k in zip(fields, line_numbers) if len(f) != 2)
    raise DataError(f"{path} line {bad}: expected 'relative/path label', got "
                    f"{lines[bad - 1].decode('utf-8', 'replace').strip()!r}.")
  return (np.array([f[0].strip() for f in fields], dtype=np.bytes_),
          np.array([f[1] for f in fields], dtype=np.bytes_), line_numbers)


def parse_list(path, num_classes: int) -> ImageList:
  """Reads and validates a `relative/path label` list.

  Args:
    path: the list file, local or anything etils.epath opens (gs://...).
    num_classes: C; every label must lie in [0, C).

  Returns:
    ImageList.

  Raises:
    MissingDataError: the file does not exist.
    DataError: the file cannot be read, a malformed line or a label outside
      [0, C) (naming the line).
  """
  path = storage.as_path(path)
  try:
    raw = path.read_bytes()
  except FileNotFoundError as e:
    raise MissingDataError(f"list file {path} does not exist.") from e
  # Remote backends raise more than OSError (tf.errors.OpError, auth errors).
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"cannot read list file {path}: {_cause(e)}.") from e
  fields = _split_fast(raw)
  if fields is None:  # Paths with spaces, or a malformed line somewhere.
    fields = _split_per_line(path, raw)
  rel_paths, tokens, line_numbers = fields
  try:
    labels = tokens.astype(np.int64)
  except ValueError:
    raise _first_bad_label(path, tokens, line_numbers) from None
  outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if outside.size:
    k = outside[0]
    raise DataError(f"{path} line {line_numbers[k]}: label {labels[k]} is outside "
                    f"[0, {num_classes}); check dataset.num_classes or the list.")
  return ImageList(path, rel_paths, labels.astype(np.int32), line_numbers,
                   hashlib.sha256(raw).hexdigest())


def check_no_empty_class(image_list: ImageList, num_classes: int) -> None:
  """Raises DataError naming the first class without a training image."""
  counts = np.bincount(image_list.labels, minlength=num_classes)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise DataError(
        f"{image_list.path}: class {empty[0]} has no training image ({empty.size} "
        f"empty classes of {num_classes}); its log prior would be -inf. Fix the list "
        "or dataset.num_classes, or set dataset.zero_count_smoothing > 0.")


def check_paths_exist(image_list: ImageList, image_root) -> None:
  """Raises MissingDataError for the first entry whose image does not exist.

  A local folder only: one `os.path.isfile` per entry (50,000 in a fraction of
  a second). A remote root (gs://...) is not checked here, as one request per
  image would delay the first step by minutes; its missing images are
  reported when they are read (`pipeline.FileReader.missing`).

  Args:
    image_list: the parsed list.
    image_root: the folder its paths are relative to.
  """
  if storage.is_remote(image_root):
    return
  # os.path on bytes, not epath: an epath.Path per entry is ~5x slower (1 s here).
  root = os.fsencode(image_root)
  for row, rel in enumerate(image_list.rel_paths):
    if not os.path.isfile(os.path.join(root, rel)):
      raise MissingDataError(
          f"{image_list.where(row)}: image {os.path.join(root, rel).decode('utf-8', 'replace')} "
          "does not exist; check dataset.image_root.")


@dataclasses.dataclass(frozen=True)
class ListFiles:
  """The resolved list files of a config: split name -> path."""
  layout: ListLayout
  num_classes: int
  split_dir: epath.Path
  train: epath.Path
  evals: dict


def get_layout(name: str) -> ListLayout:
  if name not in LAYOUTS:
    raise ConfigError(f"dataset.name={name!r} has no split lists; allowed: {sorted(LAYOUTS)}.")
  return LAYOUTS[name]


def _split_dir(cfg, layout) -> epath.Path:
  if cfg.get("split_dir"):
    return storage.as_path(cfg.split_dir)
  if layout.num_classes and SHARED_SPLIT_DIR.is_dir():
    return epath.Path(SHARED_SPLIT_DIR)  # The published val/test lists live there.
  raise ConfigError(
      f"dataset.split_dir is empty: set it to the folder holding the list files of "
      f"{cfg.name!r} (lists from {layout.published}).")


def resolve_list_files(cfg) -> ListFiles:
  """Names the list files of `cfg` (the `config.dataset` ConfigDict).

  Named datasets use their published file names unless `dataset.train_list`,
  `dataset.test_list` or `dataset.val_list` is set; `image_list` needs
  `dataset.num_classes`, `dataset.train_list` and `dataset.test_list`.

  Returns:
    ListFiles (the files are not opened here).
  """
  layout = get_layout(cfg.name)
  num_classes = layout.num_classes or int(cfg.get("num_classes", 0) or 0)
  if num_classes <= 0:
    raise ConfigError(f"dataset.num_classes must be > 0 for dataset.name={cfg.name!r}, "
                      f"got {cfg.get('num_classes')}.")
  split_dir = _split_dir(cfg, layout)
  train = cfg.get("train_list") or layout.train_list
  evals = dict(layout.eval_lists)
  for split in ("test", "val"):
    if cfg.get(f"{split}_list"):
      evals[split] = cfg.get(f"{split}_list")
  if not train or "test" not in evals:
    raise ConfigError(f"dataset.train_list and dataset.test_list must name list files "
                      f"in {split_dir} for dataset.name={cfg.name!r}.")
  return ListFiles(layout, num_classes, split_dir, split_dir / train,
                   {s: split_dir / f for s, f in evals.items()})


def missing_list_message(path: epath.Path, layout: ListLayout) -> str:
  """One line: which file, where it was looked for, where it is published."""
  where = f"list file {path.name} not found in {path.parent} (dataset.split_dir)"
  if not layout.num_classes:  # A generic image list: the user's own file.
    return (f"{where}; check dataset.train_list / test_list / val_list and "
            "dataset.split_dir.")
  return (f"{where}; get it from {layout.published} and put it there, or point "
          "dataset.split_dir at its folder.")


def list_exists(path: epath.Path) -> bool:
  """Whether the list file `path` exists; DataError if that cannot be asked."""
  path = storage.as_path(path)
  return _probe(path.is_file, path, "list file")


def load_list(path: epath.Path, layout: ListLayout, num_classes: int) -> ImageList:
  """parse_list with the missing-file message of the dataset."""
  if not list_exists(path):
    raise MissingDataError(missing_list_message(storage.as_path(path), layout))
  return parse_list(path, num_classes)


def require_image_root(cfg, layout: ListLayout) -> epath.Path:
  """`dataset.image_root` as a folder, or a ConfigError saying what to set.

  A remote root (gs://bucket/imagenet) is one request here: a folder on Cloud
  Storage exists when some object lies under it.

  Returns:
    epath.Path of the folder, local or remote.
  """
  if not cfg.get("image_root"):
    raise ConfigError(f"dataset.image_root is empty: set it to {layout.root_hint}, "
                      "the folder the paths in the lists are relative to.")
  root = storage.as_path(cfg.image_root)
  if not _probe(root.is_dir, root, "dataset.image_root"):
    raise MissingDataError(f"dataset.image_root={str(root)!r} is not a folder; set it to "
                           f"{layout.root_hint}.")
  return root
