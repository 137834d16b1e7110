"""Long-tailed dataset construction and the class prior it induces.

The CIFAR-LT rule is the one used by LDAM-DRW and the official Prior-LT code
(and by every CIFAR-LT number in the paper): with `np.random.seed(0)`, for
each class c in 0..C-1 shuffle that class's indices (in dataset order) with
`np.random.shuffle` and keep the first n_c of them, where

    exp:  n_c = int(n_max * (1 / rho) ** (c / (C - 1)))
    step: n_c = n_max for the first half of the classes, int(n_max / rho) after.

The prior pi, log pi and the counts are computed once here and handed to the
sampler, the mixing and the loss.
"""

from typing import NamedTuple

import numpy as np

from lt_calib.errors import ConfigError, DataError

PROFILES = ("exp", "step")


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                     profile: str = "exp") -> np.ndarray:
  """Per-class image counts of a long-tailed split.

  Args:
    n_max: images kept in the largest class (class 0).
    num_classes: C.
    imbalance_ratio: rho = n_max / n_min, must be >= 1.
    profile: 'exp' (exponential decay over class index) or 'step'.

  Returns:
    int64 array [C] of counts, class 0 first.
  """
  if not imbalance_ratio >= 1:
    raise ConfigError(
        f"dataset.imbalance_ratio must be >= 1 (1 = balanced), got {imbalance_ratio}.")
  if profile not in PROFILES:
    raise ConfigError(
        f"dataset.imbalance_type={profile!r} is unknown; allowed: {PROFILES}.")
  if profile == "exp":
    if num_classes == 1:
      return np.array([n_max], dtype=np.int64)
    exponents = np.arange(num_classes) / (num_classes - 1)
    # Python float arithmetic per class, as in the reference builders, so the
    # int() truncation lands on exactly the same integers.
    return np.array([int(n_max * (1.0 / imbalance_ratio) ** e) for e in exponents],
                    dtype=np.int64)
  half = num_classes // 2
  counts = [n_max] * half + [int(n_max / imbalance_ratio)] * (num_classes - half)
  return np.array(counts, dtype=np.int64)


def select_long_tail(labels: np.ndarray, counts: np.ndarray,
                     seed: int = 0) -> np.ndarray:
  """Indices kept by the standard CIFAR-LT rule.

  Args:
    labels: int [N] labels of the full (balanced) training set, dataset order.
    counts: int [C] images to keep per class.
    seed: seed of the legacy global NumPy generator (0 in every CIFAR-LT paper).

  Returns:
    int64 array of kept indices, grouped by class in class order, each class
    in its shuffled order.
  """
  # The legacy RandomState stream is part of the benchmark's definition: a new
  # Generator would select different images. A private RandomState(seed) gives
  # the same stream as np.random.seed(seed) without touching global state.
  rng = np.random.RandomState(seed)
  kept = []
  for c, n_c in enumerate(counts):
    idx = np.where(labels == c)[0]
    if n_c > len(idx):
      raise DataError(f"class {c} has {len(idx)} images in the data, cannot keep "
                      f"{n_c}: the data is not the full dataset that dataset.name says.")
    rng.shuffle(idx)
    kept.append(idx[:n_c])
  return np.concatenate(kept).astype(np.int64)


class ClassPrior(NamedTuple):
  """Train label statistics shared by the sampler, the mixing and the loss."""
  counts: np.ndarray     # int64 [C]: training images per class.
  prior: np.ndarray      # float64 [C]: pi_c = n_c / N.
  log_prior: np.ndarray  # float64 [C]: log pi_c.


def class_prior(labels: np.ndarray, num_classes: int,
                zero_count_smoothing: float = 0.0) -> ClassPrior:
  """Counts, prior pi and log pi of a training set.

  Args:
    labels: int [N] training labels.
    num_classes: C.
    zero_count_smoothing: pseudo-count added to EVERY class when computing pi.
      0 (default) refuses a class with no training image, whose log pi would
      be -inf and would break the Bayias offset and the UniMix factor.

  Returns:
    ClassPrior.
  """
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
        f"labels must lie in [0, {num_classes}) but span [{labels.min()}, "
        f"{labels.max()}]; check dataset.num_classes.")
  counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
  if zero_count_smoothing < 0:
    raise ConfigError("dataset.zero_count_smoothing must be >= 0, got "
                      f"{zero_count_smoothing}.")
  empty = np.where(counts == 0)[0]
  if len(empty) and zero_count_smoothing == 0:
    raise ConfigError(
        f"classes {empty.tolist()[:10]} have zero training images, so log pi is "
        "-inf. Lower dataset.imbalance_ratio, or set "
        "dataset.zero_count_smoothing > 0 to add a pseudo-count to every class.")
  smoothed = counts + zero_count_smoothing
  prior = smoothed / smoothed.sum()
  return ClassPrior(counts=counts, prior=prior, log_prior=np.log(prior))
