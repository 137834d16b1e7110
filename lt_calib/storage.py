"""Where files live: local folders or an object store (gs://), through one client.

Every path the library opens (workdirs, split lists, images, caches) goes
through `etils.epath`. For gs:// it uses fsspec's `gcsfs`, not TensorFlow's
`tf.io.gfile`: gcsfs can be pointed at a local emulator
(`STORAGE_EMULATOR_HOST`, as the tests do) and can append to an object by
composing it server-side, where gfile has a fixed endpoint and appends by
downloading and re-uploading the whole object. Orbax writes checkpoint
arrays through TensorStore, whose GCS driver is a client of its own
(`TENSORSTORE_GCS_HTTP_URL` points it elsewhere); see docs/data.md.

Files written here appear whole: locally through a temporary file and a
rename, on an object store because an object is only visible once uploaded.
Appends (the JSON-lines logs) cost one small write each, not a rewrite.
"""

import csv
import io
import os
import pathlib
import re
import uuid

from etils import epath

from lt_calib.errors import MissingDependencyError

# etils picks tf.io.gfile for gs:// whenever TensorFlow is installed unless
# told otherwise; a user who wants gfile back sets EPATH_USE_TF=true.
os.environ.setdefault("EPATH_USE_TF", "false")


def _list_afresh() -> None:
  """Every gcsfs client of this process asks the server for each listing.

  A workdir on gs:// is written by other processes (the other hosts, the run
  a preemption stopped and the one that resumed it), and gcsfs would
  otherwise answer a listing from its first answer for the life of the
  process: Orbax, listing `checkpoints/` through etils' client, would then
  restore or evaluate a step that is no longer the latest. Set here, before
  any client exists; a user's own fsspec setting is kept.
  """
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:  # No gs:// support installed; gcs_filesystem says so.
    return
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_list_afresh()

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The workplace's shared data folder beside the checkout (offline .npz files
# and the published split lists); absent on a user's machine.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

# 'scheme://' of a path that an etils.epath backend serves (gs://, s3://, ...).
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path) -> bool:
  """Whether `path` names an object store (gs://, s3://, ...), not a local file."""
  return bool(_URI_SCHEME.match(os.fspath(path)))


def as_path(value) -> epath.Path:
  """A config path (str or path-like, '~' expanded) as an `etils.epath.Path`."""
  value = os.fspath(value)
  return epath.Path(value if is_remote(value) else os.path.expanduser(value))


def local_or_resolved(value) -> epath.Path:
  """`as_path`, made absolute when local (Orbax wants absolute folders)."""
  path = as_path(value)
  return path if is_remote(path) else epath.Path(os.path.abspath(path))


def cache_dir(dataset_config=None) -> epath.Path:
  """Folder for derived data (decoded images, TFDS record indices).

  `dataset.cache_dir` if set (local or gs://), else `$LT_CALIB_CACHE_DIR`,
  else `~/.cache/lt_calib`.
  """
  chosen = (dataset_config.get("cache_dir", "") if dataset_config is not None else "")
  return as_path(chosen or os.environ.get("LT_CALIB_CACHE_DIR")
                 or pathlib.Path.home() / ".cache" / "lt_calib")


def write_text(path, text: str) -> None:
  """Writes `text` whole.

  Locally via a per-process temporary file and a rename, so a reader (or
  another grid worker writing the same file) never sees half of it.
  """
  path = as_path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  tmp.replace(path)


# Seconds one Cloud Storage request may take before gcsfs gives up on it and
# retries it (its retry rules): without a bound, a connection that never
# answers stalls the read (or the tf.data worker waiting on it) for good.
GCS_REQUEST_TIMEOUT_S = 120


def write_csv(path, rows: list) -> None:
  """`rows` (dicts with the same keys) as a CSV file with a header, written whole."""
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  write_text(path, text.getvalue())


def gcs_filesystem():
  """The gcsfs client every gs:// read and append of the library goes through."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.filesystem("gs", requests_timeout=GCS_REQUEST_TIMEOUT_S)
  except ImportError as e:
    raise MissingDependencyError("gs:// paths need gcsfs: pip install -e '.[gcs]'.") from e


def append_text(path, text: str) -> None:
  """Appends `text` to a file, creating it if needed: one write of `text` only.

  Locally an append-mode write. On gs:// the text goes to a small object that
  is composed onto the file (a server-side concatenation) and deleted; an
  object store has no append, and rewriting the whole file each time would
  cost O(n^2) bytes over a run.
  """
  path = as_path(path)
  if not is_remote(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  if not str(path).startswith("gs://"):
    path.write_text((path.read_text() if path.exists() else "") + text)
    return
  fs = gcs_filesystem()
  target = str(path)
  if not fs.exists(target):
    fs.pipe(target, text.encode())
    return
  part = f"{target}.append-{uuid.uuid4().hex}"
  fs.pipe(part, text.encode())
  try:
    fs.merge(target, [target, part])
  finally:
    fs.rm(part)


def read_bytes(path) -> bytes:
  """The bytes of a (local or remote) file; `path` may be str, bytes or a 0-d array."""
  if hasattr(path, "item"):  # A tf.numpy_function argument.
    path = path.item()
  return as_path(os.fsdecode(path)).read_bytes()


def read_many(paths) -> list:
  """The bytes of several files; on gs:// fetched concurrently (gcsfs's event loop).

  Raises:
    FileNotFoundError (or the client's error) for the first file that fails.
  """
  paths = [os.fsdecode(p) for p in paths]
  if not paths or not paths[0].startswith("gs://"):
    return [read_bytes(p) for p in paths]
  fetched = gcs_filesystem().cat(paths, on_error="return")
  out = []
  for path in paths:
    data = fetched[path] if path in fetched else fetched.get(path[len("gs://"):])
    if isinstance(data, BaseException):
      raise data
    out.append(data)
  return out


def exists(path) -> bool:
  """Whether a file exists now (on gs://, asked of the server: `_list_afresh`)."""
  return as_path(path).exists()
