"""Checkpoints with their fingerprints, and preemption-safe stopping.

A checkpoint is an Orbax composite with one item, 'state' (the TrainState:
parameters, BatchNorm statistics, optimizer state, step), and Orbax's
per-step custom metadata: the SHA-256 fingerprint of parameters and
BatchNorm statistics, and the software and hardware that produced them.
Orbax also keeps the cadence (`save_interval_steps`). Orbax writes each checkpoint into
a temporary folder and renames it when complete, so a process killed while
saving leaves nothing that a later run would restore.

Resume order: the latest complete checkpoint in `<workdir>/checkpoints`,
else a fresh initialisation from the config's seed.
"""

import hashlib
import signal

import jax
from jax.experimental import multihost_utils
import jaxlib
import numpy as np
import orbax.checkpoint as ocp

from lt_calib import parallel, storage

STATE = "state"


def fingerprint(state) -> str:
  """SHA-256 of the parameters and BatchNorm statistics of `state`.

  The leaves are hashed in the fixed order of their tree paths, each as its
  path, dtype, shape and raw bytes, so two states have the same fingerprint
  exactly when every leaf is bit-identical.

  Args:
    state: a TrainState (or anything with `params` and `batch_stats`).

  Returns:
    64 hexadecimal digits.
  """
  digest = hashlib.sha256()
  tree = {"params": state.params, "batch_stats": state.batch_stats}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = np.ascontiguousarray(parallel.local_value(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{value.dtype.str}{value.shape}".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def environment() -> dict:
  """The software and hardware a result depends on, for summaries and checkpoints."""
  device = jax.devices()[0]
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "backend": jax.default_backend(), "device_count": jax.device_count(),
          "device_kind": device.device_kind, "process_count": jax.process_count()}


def make_manager(workdir, max_to_keep: int | None, read_only: bool = False,
                 save_interval_steps: int | None = None):
  """Orbax manager of `<workdir>/checkpoints` (local path or gs://).

  Args:
    workdir: the run's folder.
    max_to_keep: checkpoints kept (None: all).
    read_only: the manager only restores: it creates and deletes nothing.
      Orbax's own read_only option is not used because it logs three
      warnings per manager.
    save_interval_steps: `save` without `force` writes only on multiples of
      this (and the first time); None: every time.

  Returns:
    an `ocp.CheckpointManager`.
  """
  directory = storage.local_or_resolved(workdir) / "checkpoints"
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, create=not read_only,
      save_interval_steps=save_interval_steps)
  # The handler named up front: reading only the metadata then needs no
  # restore first (Orbax warns about an item it has no handler for).
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers={STATE: ocp.StandardCheckpointHandler()})


def save(manager, step: int, state, extra_meta: dict | None = None,
         force: bool = True) -> dict | None:
  """Starts saving `state` at `step` with its fingerprint.

  Args:
    manager: from `make_manager`.
    step: the global step.
    state: the TrainState.
    extra_meta: more JSON fields for the metadata.
    force: save whatever the manager's interval says (ends, stops).

  Returns:
    the metadata written, or None where the interval skipped this step.
  """
  if not force and not manager.should_save(int(step)):
    return None
  meta = {"step": int(step), "fingerprint": fingerprint(state), **environment(),
          **(extra_meta or {})}
  manager.save(int(step), args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state)}),
               custom_metadata=meta, force=force)
  return meta


def restore(manager, step: int, target):
  """The TrainState saved at `step`, laid out (shardings) like `target`."""
  restored = manager.restore(int(step), args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(target)}))
  return restored[STATE]


def read_meta(manager, step: int) -> dict:
  """The metadata (fingerprint, environment) saved with checkpoint `step`."""
  return dict(manager.metadata(int(step)).custom_metadata)


def read_state_tree(workdir, step: int | None = None) -> tuple:
  """(step, state as a plain nested dict of arrays) of a run's checkpoint.

  For inspection and tests: no target is needed, and arrays come back on
  this process's first device whatever mesh (devices, processes) saved them.
  """
  manager = make_manager(workdir, max_to_keep=1, read_only=True)
  step = manager.latest_step() if step is None else step
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(fallback_sharding=here)}))
  manager.close()
  return step, restored[STATE]


class PreemptionWatcher:
  """Turns SIGTERM into a stop at a boundary that every process agrees on.

  With JAX's distributed runtime, its preemption sync manager catches the
  signal on whichever host gets it and tells the others; each host then
  stops at the same boundary (hosts that decided alone could save different
  steps). The agreed boundary is one past the largest counter any host had
  reported, and only that exact counter matches, so `reached` must be asked
  at every boundary with a counter that grows by one each time. A single
  process has no one to agree with: a Python handler sets a flag.
  """

  def __init__(self):
    self._flag = False
    self._previous = None
    self._distributed = jax.distributed.is_initialized()
    if not self._distributed:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      except ValueError:  # Not the main thread: leave signals alone.
        self._previous = None

  def _on_signal(self, signum, frame):
    del signum, frame
    self._flag = True

  def reached(self, boundary: int) -> bool:
    """True once a preemption was signalled; ask at every boundary, on all hosts.

    Args:
      boundary: 1, 2, 3, ... for the successive boundaries of this process's
        run (the same sequence on every host).
    """
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(int(boundary))
    return self._flag

  def close(self):
    """Gives SIGTERM back to the handler that held it before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
