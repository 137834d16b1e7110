"""What a workdir remembers about its run, so a resume never mixes two runs.

`<workdir>/config.json` holds the resolved config and `<workdir>/run.json`
the identity of the data (file SHA-256 or TFDS name and version) and every
config change a resume was explicitly allowed to make. Rerunning a workdir
with another config or other data stops with the changed fields, unless
`--allow_config_change` is given; the change is then recorded.
"""

import hashlib
import json
import os

from etils import epath

from lt_calib import storage
from lt_calib.errors import WorkdirError

# Fields that do not change what a run computes (logging, cadence of outputs,
# where the same data is read from: its identity is compared separately).
BOOKKEEPING_FIELDS = (
    "log_every_steps", "tensorboard", "keep_checkpoints", "checkpoint_every_epochs",
    "eval_every_epochs", "eval_batch_size", "steps_per_dispatch", "dataset.source",
    "dataset.data_file", "dataset.tfds_data_dir", "dataset.cache_dir",
    "dataset.image_root", "dataset.split_dir")


def flatten(tree: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_dict(config) -> dict:
  """The config as plain JSON data (tuples become lists, as on disk)."""
  return json.loads(config.to_json_best_effort())


# Fields added after runs were saved without them, each with the value that
# computes what those runs computed: a saved config that lacks the field
# matches a new one holding this value (so an upgrade does not stop resumes).
FIELDS_ADDED_LATER = {
    "optim.schedule": "steps", "loss.las_head": 0.3, "loss.las_tail": 0.0,
    "loss.las_shape": "concave", "stage2.enabled": False, "stage2.first_stage": "",
    "stage2.batchnorm": "frozen", "dataset.n_max": 0,
}


def config_differences(saved: dict, config, ignore=BOOKKEEPING_FIELDS) -> dict:
  """{dotted field: [saved value, new value]} where `config` differs from `saved`."""
  a, b = flatten(saved), flatten(config_dict(config))
  for key, value in FIELDS_ADDED_LATER.items():
    if key not in a and b.get(key) == value:
      a[key] = value
  return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
          if k not in ignore and a.get(k) != b.get(k)}


def file_sha256(path) -> str:
  """SHA-256 of a file's bytes, read in 16 MiB blocks."""
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def data_identity(dataset) -> dict:
  """What the training data is, independent of where it is read from.

  Args:
    dataset: a loaded `sources.Dataset` (source 'offline:<path>' or
      'tfds:<name>') or a streaming dataset with its own `identity`.

  Returns:
    dict: the offline file's name and SHA-256, TFDS name and version, or the
    streaming dataset's list hashes; plus the training class counts.
  """
  identity = dict(getattr(dataset, "identity", None) or {})
  kind, _, where = dataset.source.partition(":")
  if not identity and kind == "offline":
    identity = {"file": os.path.basename(where), "sha256": file_sha256(where)}
  elif not identity and kind == "tfds":
    identity = {"tfds": where, "version": _tfds_version(where)}
  identity["train_class_counts"] = [int(c) for c in dataset.prior.counts]
  return identity


def _tfds_version(name: str) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return str(tfds.builder(name).version)


def read_json(path) -> dict | None:
  """A JSON file's content, or None where it does not exist."""
  return json.loads(path.read_text()) if path.exists() else None


def check(workdir, config, identity: dict, allow_change: bool) -> dict:
  """Compares the run about to start with what `workdir` holds.

  Args:
    workdir: the run's folder (local or gs://).
    config: the resolved config of this invocation.
    identity: `data_identity` of this invocation's data.
    allow_change: continue despite differences (they are returned).

  Returns:
    {dotted field: [old, new]} of the accepted changes ('data' for the data
    identity); empty for a new workdir or an unchanged config.

  Raises:
    WorkdirError: the workdir holds another config or other data and
      `allow_change` is False.
  """
  workdir = epath.Path(workdir)
  saved_config = read_json(workdir / "config.json")
  if saved_config is None:
    return {}
  changes = config_differences(saved_config, config)
  saved_run = read_json(workdir / "run.json") or {}
  if saved_run.get("data") not in (None, identity):
    changes["data"] = [saved_run["data"], identity]
  if changes and not allow_change:
    shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in changes.items()
                      if k != "data")
    if "data" in changes:
      shown = "; ".join(filter(None, [shown, "the training data differ"]))
    raise WorkdirError(
        f"workdir {workdir} holds a run of another config ({shown}); use a new "
        "--workdir, or pass --allow_config_change to continue it with this one.")
  return changes


def write(workdir, config, identity: dict, changes: dict, step: int,
          first_stage: dict | None = None) -> dict:
  """Saves config.json and run.json (process 0 only); returns the run record.

  `first_stage`: what identifies a second stage's first stage
  (lt_calib/train/two_stage.py), kept in run.json; None for other runs.
  """
  workdir = epath.Path(workdir)
  record = read_json(workdir / "run.json") or {"config_changes": []}
  record["data"] = identity
  if first_stage is not None:
    record["first_stage"] = first_stage
  if changes:
    record["config_changes"].append({"resumed_at_step": int(step), "changes": changes})
  storage.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
  storage.write_text(workdir / "run.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
  return record


def open_workdir(workdir) -> epath.Path:
  """The workdir as a path, created if needed (local folders checked first)."""
  workdir = storage.as_path(workdir)
  if not storage.is_remote(workdir) and workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a folder; choose a folder.")
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir
