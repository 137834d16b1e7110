"""Which training rows and augmentation seeds each step of a streamed run uses.

The rows come from the same law, keys and code as a run whose data lives on
the devices: `sampling.batch_indices` with the run's keys (the epoch
permutation R from the data key and the epoch, the batch key from the step),
here run on this host's CPU before any file is read. So a streamed run and
an in-memory run of the same seed draw the same rows, and the sequence is a
pure function of (seed, step): a run resumed at step k reads exactly what an
uninterrupted run would, whatever was prefetched.

Augmentation happens in tf.data with stateless ops; its two seeds per row of
the GLOBAL batch come from `default_rng((seed, STREAM_AUGMENT, stream,
step))`, so a host's rows do not depend on how many hosts there are.
"""

import functools
from typing import NamedTuple, Optional

import jax
import numpy as np

from lt_calib.errors import ConfigError
from lt_calib.method import sampling

STREAM_AUGMENT = 4       # Seed stream of the stateless augmentation.
MAIN, PARTNER = 0, 1     # Its sub-streams: main and partner images.


def check_seed(seed: int, step: int) -> None:
  # SeedSequence takes non-negative integers only.
  if seed < 0 or step < 0:
    raise ConfigError(f"seed and step must be >= 0 for the input pipeline, got "
                      f"seed={seed}, step={step}.")


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  """N // B: the last partial batch of an epoch is dropped."""
  if global_batch <= 0 or num_examples < global_batch:
    raise ConfigError(f"batch_size={global_batch} must be in [1, {num_examples}], "
                      "the number of training images.")
  return num_examples // global_batch


def augmentation_seeds(seed: int, step: int, stream: int, global_batch: int) -> np.ndarray:
  """int64 [B, 2] seeds of the stateless crop/flip of each global-batch row."""
  check_seed(seed, step)
  rng = np.random.default_rng((seed, STREAM_AUGMENT, stream, step))
  return rng.integers(0, 2**31 - 1, size=(global_batch, 2), dtype=np.int64)


def checked_rows(rows, global_batch: int) -> np.ndarray:
  """A process's rows of the global batch (`parallel.process_rows`), checked.

  Raises:
    ConfigError: a row outside [0, global_batch), a repeated row, or no row.
  """
  rows = np.asarray(rows, np.int64)
  if rows.ndim != 1 or not rows.size or rows.min() < 0 or rows.max() >= global_batch \
      or np.unique(rows).size != rows.size:
    raise ConfigError(f"the rows of this process must be distinct positions in "
                      f"[0, {global_batch}), got {rows.tolist()[:8]}...")
  return rows


def eval_positions(num_examples: int, global_batch: int) -> np.ndarray:
  """int64 [num_batches, B]: positions 0..M-1 of the split, then -1 padding."""
  num_batches = max(1, -(-num_examples // global_batch))
  positions = np.arange(num_batches * global_batch, dtype=np.int64)
  return np.where(positions < num_examples, positions, -1).reshape(num_batches, global_batch)


class Laws(NamedTuple):
  """The samplers of a run: what `sampling.batch_indices` needs besides keys."""
  main_log_probs: Optional[np.ndarray]     # [C] of a class-level main sampler; None = R.
  partner_log_probs: Optional[np.ndarray]  # [C] of R*; None = no partner batch.


class IndexSequence:
  """The global rows of every step of a run, computed on this host's CPU.

  Args:
    seed: the run's seed (`sampling.RunKeys.from_seed`).
    labels: int [N] training labels.
    num_classes: C.
    global_batch: B.
    laws: the run's samplers.
  """

  def __init__(self, seed: int, labels: np.ndarray, num_classes: int, global_batch: int,
               laws: Laws):
    check_seed(seed, 0)
    self.seed, self.global_batch, self.laws = seed, global_batch, laws
    self.num_examples = len(labels)
    self.steps_per_epoch = steps_per_epoch(self.num_examples, global_batch)
    self._cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(self._cpu):
      self._keys = sampling.RunKeys.from_seed(seed)
      self._class_index = sampling.class_index(np.asarray(labels), num_classes)
    self._rows = jax.jit(functools.partial(
        sampling.batch_indices, batch_size=global_batch,
        steps_per_epoch=self.steps_per_epoch))

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int):
    with jax.default_device(self._cpu):
      return sampling.epoch_permutation(self._keys.data, epoch, self.num_examples)

  def __call__(self, step: int, partners: bool = True) -> dict:
    """{'main': int64 [B]} (+ 'partner' [B] if R* partners are drawn and asked for)."""
    check_seed(self.seed, step)
    with jax.default_device(self._cpu):
      batch_key, _ = self._keys.step_keys(step)
      main, partner = self._rows(
          batch_key, step, self._permutation(step // self.steps_per_epoch),
          self._class_index, self.laws.main_log_probs,
          self.laws.partner_log_probs if partners else None)
    rows = {"main": np.asarray(main, np.int64)}
    if partner is not None:
      rows["partner"] = np.asarray(partner, np.int64)
    return rows
