"""Samplers of Algorithm 1, drawn on the accelerator from the run's key.

- R, the random sampler: every epoch is a fresh permutation of the training
  set (without replacement); step t of the epoch takes its t-th slice.
- R*, the UniMix (class-level) sampler of Eq. 9: a class c with probability
  P_inv(c) = pi_c^tau / sum_k pi_k^tau, then an image of c uniformly.
  tau = 1 gives back a random draw with replacement, tau = 0 class-balanced.
- In-batch pairing, as in the official PyTorch code: partner k of each sample
  drawn from the same batch with probability proportional to n_{y_k}^tau.
  The batch follows pi, so a partner's class follows n_c^(1+tau), not pi^tau.

`sampler.name` picks the sampler of the main batch: 'random' (R above) or a
class-level re-sampler, R* with a fixed tau (with replacement):
'class_balanced' (tau = 0: class uniform, then image uniform) and
'square_root' (tau = 0.5: class probability proportional to sqrt(n_c)), the
re-sampling baselines of e.g. Kang et al. 2020 ("Decoupling representation and
classifier"), Sec. 3.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lt_calib.errors import ConfigError


# sampler.name -> tau of the class-level sampler (None: the epoch permutation R).
BATCH_SAMPLERS = {"random": None, "class_balanced": 0.0, "square_root": 0.5}


def get_batch_sampler_tau(name: str) -> float | None:
  """Looks up `sampler.name`, listing the allowed names if unknown."""
  if name not in BATCH_SAMPLERS:
    raise ConfigError(f"sampler.name={name!r} is unknown; allowed: {sorted(BATCH_SAMPLERS)}.")
  return BATCH_SAMPLERS[name]


class ClassIndex(NamedTuple):
  """Training indices grouped by class, so R* can draw inside one class."""
  order: jax.Array   # int32 [N]: training indices sorted by class (stable).
  start: jax.Array   # int32 [C]: where class c begins in `order`.
  counts: jax.Array  # int32 [C]: n_c.


def class_index(labels: np.ndarray, num_classes: int) -> ClassIndex:
  """Builds the per-class lookup used by `class_level_sample` (host side)."""
  order = np.argsort(labels, kind="stable").astype(np.int32)
  counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
  start = (np.cumsum(counts) - counts).astype(np.int32)
  return ClassIndex(jnp.asarray(order), jnp.asarray(start), jnp.asarray(counts))


def epoch_permutation(key: jax.Array, epoch, num_examples: int) -> jax.Array:
  """The random sampler R's order of the training set in epoch `epoch`.

  Args:
    key: the run's data key; each epoch folds in its number, so any epoch is
      reproducible from the key alone (resumption included).
    epoch: the epoch number (traced or not).
    num_examples: N.

  Returns:
    int32 [N], a permutation of 0..N-1.
  """
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def permutation_slice(permutation: jax.Array, step: jax.Array, batch_size: int,
                      steps_per_epoch: int) -> jax.Array:
  """Indices of batch `step` under R: its slot of the epoch's permutation.

  Args:
    permutation: `epoch_permutation` of the step's epoch.
    step: global step (traced).
    batch_size: global batch size.
    steps_per_epoch: N // batch_size (the last partial batch is dropped so
      every step has the same shape and compiles once).

  Returns:
    int32 [batch_size] indices, distinct within an epoch.
  """
  position = (step % steps_per_epoch) * batch_size
  return jax.lax.dynamic_slice_in_dim(permutation, position, batch_size)


def epoch_permutation_slice(key: jax.Array, step: jax.Array, num_examples: int,
                            batch_size: int, steps_per_epoch: int) -> jax.Array:
  """Indices of batch `step` under R, from the key (`epoch_permutation` + slice)."""
  permutation = epoch_permutation(key, step // steps_per_epoch, num_examples)
  return permutation_slice(permutation, step, batch_size, steps_per_epoch)


def class_level_log_probs(prior: np.ndarray, tau: float) -> np.ndarray:
  """log P_inv(c) of Eq. 9: tau * log pi_c, normalised."""
  logits = tau * np.log(prior)
  return logits - np.logaddexp.reduce(logits)


def class_level_sample(key: jax.Array, index: ClassIndex, log_class_probs: jax.Array,
                       batch_size: int) -> jax.Array:
  """Draws a batch from R*: class by P_inv, then an image of it uniformly.

  Args:
    key: PRNG key.
    index: ClassIndex of the training set.
    log_class_probs: [C] log P_inv(c) (see `class_level_log_probs`).
    batch_size: number of draws (with replacement).

  Returns:
    int32 [batch_size] training indices.
  """
  class_key, member_key = jax.random.split(key)
  # A class without images (possible with dataset.zero_count_smoothing) can
  # have prior mass but nothing to draw: never pick it.
  log_class_probs = jnp.where(index.counts > 0, log_class_probs, -jnp.inf)
  classes = jax.random.categorical(class_key, log_class_probs, shape=(batch_size,))
  counts = index.counts[classes]
  offset = jax.random.randint(member_key, (batch_size,), 0, jnp.maximum(counts, 1))
  return index.order[index.start[classes] + offset]


def batch_indices(key: jax.Array, step, permutation, class_index: ClassIndex,
                  main_log_probs, partner_log_probs, batch_size: int,
                  steps_per_epoch: int) -> tuple:
  """The training rows of one global batch: its main batch and its R* partners.

  The one law of which images a step uses, for data held on the devices
  (traced inside the step) and for streamed data (run on the host by
  lt_calib.data.index_sequence): the same key gives the same rows.

  Args:
    key: the step's batch key. Its split(3)[0] draws the partners, and
      fold_in(key, 3) the class-level main batch (a key beside the split, so
      the default sampler's stream is kept).
    step: global step.
    permutation: R's permutation of the step's epoch (`epoch_permutation`).
    class_index: ClassIndex of the training labels.
    main_log_probs: [C] log class probabilities of a class-level main
      sampler, or None for R.
    partner_log_probs: [C] log P_inv of R* (Eq. 9), or None: no partner batch.
    batch_size: B.
    steps_per_epoch: N // B.

  Returns:
    (int32 [B] main rows, int32 [B] partner rows or None).
  """
  partner_key = jax.random.split(key, 3)[0]
  if main_log_probs is None:
    main = permutation_slice(permutation, step, batch_size, steps_per_epoch)
  else:
    main = class_level_sample(jax.random.fold_in(key, 3), class_index, main_log_probs,
                              batch_size)
  partner = None if partner_log_probs is None else class_level_sample(
      partner_key, class_index, partner_log_probs, batch_size)
  return main, partner


class RunKeys(NamedTuple):
  """A run's keys, all from `jax.random.key(seed)`.

  They enter the step as arguments, not constants, so runs that differ only
  in the seed compile to one program.
  """
  init: jax.Array  # Initial parameters.
  data: jax.Array  # R's epoch permutations (the epoch number folded in).
  step: jax.Array  # Folded with the global step: batch rows, augmentation, mixing.

  @classmethod
  def from_seed(cls, seed: int) -> "RunKeys":
    return cls(*jax.random.split(jax.random.key(seed), 3))

  def step_keys(self, step) -> tuple:
    """(batch key, mix key) of global step `step`."""
    return tuple(jax.random.split(jax.random.fold_in(self.step, step)))


def in_batch_partners(key: jax.Array, labels: jax.Array, log_counts: jax.Array,
                      exponent) -> jax.Array:
  """Official-code pairing: partner of each sample drawn within the batch.

  Args:
    key: PRNG key.
    labels: int [B] labels of the batch.
    log_counts: [C] log n_c of the training set.
    exponent: batch element k is drawn with weight n_{y_k}^exponent.

  Returns:
    int32 [B] positions in the batch (with replacement).
  """
  logits = exponent * log_counts[labels]
  return jax.random.categorical(key, logits, shape=labels.shape).astype(jnp.int32)
