"""Post-hoc calibration and test-label-shift tools (pure NumPy/SciPy).

* Temperature scaling (Guo et al. 2017): one scalar T > 0, fitted by
  minimising the NLL of softmax(z / T) on a held-out validation split.
* Prior correction under label shift (Sec. 3.2, Appendix D.4): a classifier
  whose softmax(z) estimates p(y|x) under a label prior pi_ref predicts under
  a test prior pi' with softmax(z + log pi' - log pi_ref), because the class
  likelihood p(x|y) is shared and p(y|x) is proportional to p(x|y) pi_y.
* Test sets resampled to a long-tailed, balanced or reversed label
  distribution with imbalance factor rho' (Table D2).

Reference prior of a trained model (`reference_log_prior`): a CE model's raw
logits are fitted to the training posterior, so pi_ref = pi_train. A Bayias
model is trained on z + log pi_train - log pi_t (Eq. 14-15, pi_t =
`loss.test_prior`), so its raw logits z already estimate the posterior under
pi_t: pi_ref = pi_t, i.e. log(1/C) for the default uniform test prior (the
logit-adjusted case). A class-level sampler changes the prior the batches
follow, and `reference_log_prior` takes it into account (a second stage's
class-balanced batches: uniform). Mixing (UniMix, mixup) changes the
effective training prior too; that effect is not modelled here.
"""

import math

import numpy as np
import scipy.optimize
import scipy.special

from lt_calib.method import losses, sampling
from lt_calib.data import long_tail


def _nll(logits, labels, temperature):
  z = np.asarray(logits, np.float64) / temperature
  return float(np.mean(scipy.special.logsumexp(z, axis=1)
                       - np.take_along_axis(z, labels[:, None], 1)[:, 0]))


def fit_temperature(logits, labels, bounds=(1e-2, 1e2)) -> float:
  """Temperature T minimising the NLL of softmax(logits / T).

  Bounded Brent search over log T, which is deterministic and needs no
  gradient; the NLL of a fixed set is smooth and unimodal enough in log T for
  a 1-D search over [log 0.01, log 100].

  Args:
    logits: [N, C] raw logits of a held-out validation split.
    labels: int [N].
    bounds: (T_min, T_max) searched.

  Returns:
    float T > 0 (T > 1 softens over-confident predictions). 1.0 if there
    are no examples.
  """
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  if labels.size == 0:
    return 1.0
  result = scipy.optimize.minimize_scalar(
      lambda log_t: _nll(logits, labels, math.exp(log_t)),
      bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
      options={"xatol": 1e-6})
  return float(math.exp(result.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
  """Logits divided by T (argmax, hence accuracy, is unchanged)."""
  return np.asarray(logits, np.float64) / temperature


def prior_correction(logits, log_reference_prior, log_test_prior) -> np.ndarray:
  """z + log pi' - log pi_ref: the posterior under the test prior pi'.

  Args:
    logits: [N, C] raw logits z whose softmax estimates p(y|x) under pi_ref.
    log_reference_prior: [C] log pi_ref: log pi_train for a CE model, log pi_t
      (log(1/C) by default) for a Bayias model; see `reference_log_prior`.
    log_test_prior: [C] log pi' of the test label distribution.

  Returns:
    float64 [N, C] corrected logits.
  """
  shift = np.asarray(log_test_prior, np.float64) - np.asarray(
      log_reference_prior, np.float64)
  return np.asarray(logits, np.float64) + shift


def reference_log_prior(loss_cfg, train_prior, sampler_name: str = "random"
                        ) -> np.ndarray | None:
  """log pi_ref of a trained model's raw logits (module docstring), or None.

  The batches follow the sampler's label law q (pi_train for 'random',
  proportional to pi_train^tau for a class-level sampler: uniform for
  'class_balanced'). CE and label-aware smoothing fit softmax(z) to q;
  Bayias fits softmax(z + log pi_train - log pi_t) to q, so z refers to
  q pi_t / pi_train (pi_t with the default sampler); logit adjustment fits
  z + tau log pi_train, so z refers to q / pi_train^tau.

  Args:
    loss_cfg: the run's `config.loss` (name, test_prior, la_tau).
    train_prior: [C] training prior pi_train.
    sampler_name: the run's `config.sampler.name`.

  Returns:
    float64 [C] (normalised), or None for a loss whose logits refer to no
    prior in closed form (focal, class-balanced, CDT, LDAM, DRW schedules).
  """
  train_prior = np.asarray(train_prior, np.float64)
  log_train = np.log(np.maximum(train_prior, 1e-300))
  tau = sampling.BATCH_SAMPLERS.get(sampler_name)
  log_q = log_train if tau is None else tau * log_train
  if loss_cfg.get("schedule", "none") != "none":
    return None
  if loss_cfg.name in ("ce", "las"):
    log_ref = log_q
  elif loss_cfg.name == "bayias":
    log_ref = log_q - log_train + np.log(losses.parse_test_prior(
        loss_cfg.get("test_prior", "uniform"), len(train_prior)))
  elif loss_cfg.name == "logit_adjusted":
    log_ref = log_q - float(loss_cfg.get("la_tau", 1.0)) * log_train
  else:
    return None
  return log_ref - scipy.special.logsumexp(log_ref)


def shifted_counts(n_per_class: int, num_classes: int, test_rho: float) -> np.ndarray:
  """Per-class test counts of imbalance factor rho' (Appendix D.4).

  rho' >= 1 (long-tailed, class 0 largest): n'_c = int(n (1/rho')^(c/(C-1))),
  the CIFAR-LT rule (`long_tail.long_tail_counts`). rho' < 1 (reversed, class
  C-1 largest): n'_c = int(n rho'^((C-1-c)/(C-1))). rho' = 1 keeps n for all.

  Args:
    n_per_class: n, the test images available in every class.
    num_classes: C.
    test_rho: rho' > 0.

  Returns:
    int64 [C].
  """
  if not test_rho > 0:
    raise ValueError(f"test_rho must be > 0, got {test_rho}.")
  if test_rho >= 1:
    return long_tail.long_tail_counts(n_per_class, num_classes, test_rho, "exp")
  if num_classes == 1:
    return np.array([n_per_class], np.int64)
  return np.array([int(n_per_class * test_rho ** ((num_classes - 1 - c) / (num_classes - 1)))
                   for c in range(num_classes)], np.int64)


def resample_test_set(labels, test_rho: float, num_classes: int, seed: int = 0) -> np.ndarray:
  """Indices of a test subset with the label profile of `shifted_counts`.

  n is the smallest class size of `labels` (1,000 on CIFAR-10). Classes are
  visited in order with one `np.random.RandomState(seed)`; each draws its
  n'_c images without replacement from a permutation of its indices, so a
  seed gives the same subset on every machine.

  Args:
    labels: int [N] labels of the (balanced) test set.
    test_rho: rho'.
    num_classes: C.
    seed: seed of the RandomState.

  Returns:
    int64 sorted indices into `labels`.
  """
  labels = np.asarray(labels)
  per_class = [np.where(labels == c)[0] for c in range(num_classes)]
  n = min(len(idx) for idx in per_class)
  if n == 0:
    raise ValueError("a class has no test image; cannot resample the test set.")
  rng = np.random.RandomState(seed)
  kept = [rng.permutation(idx)[:n_c] for idx, n_c in
          zip(per_class, shifted_counts(n, num_classes, test_rho))]
  return np.sort(np.concatenate(kept)).astype(np.int64)


def test_prior_spec(test_rho: float, num_classes: int, n_per_class: int = 1000) -> str:
  """`loss.test_prior` string (comma-separated counts) for a rho' test set.

  Train a Bayias model for a known shifted test prior with
  `--config.loss.test_prior=$(python -c "from lt_calib.calibration import posthoc;
  print(posthoc.test_prior_spec(100, 10))")`; the counts are those of
  `shifted_counts`, so pi' is the exact label distribution of the resampled set.
  """
  return ",".join(str(int(n)) for n in shifted_counts(n_per_class, num_classes, test_rho))
