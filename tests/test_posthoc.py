"""Tests of lt_calib.calibration.posthoc: temperature scaling, prior correction, resampling."""

import ml_collections
import numpy as np
import pytest

from lt_calib.method import losses
from lt_calib.calibration import posthoc

# Appendix D.4 profiles for n = 1000 images a class (CIFAR-10's test set),
# computed by hand from n'_c = int(1000 * (1/rho')^(c/9)) for rho' >= 1 and
# int(1000 * rho'^((9-c)/9)) for rho' < 1; e.g. 1000 * 100^(-1/9) = 599.48.
CIFAR10_TEST_COUNTS = {
    100: [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10],
    10: [1000, 774, 599, 464, 359, 278, 215, 166, 129, 100],
    1: [1000] * 10,
    0.1: [100, 129, 166, 215, 278, 359, 464, 599, 774, 1000],
    0.01: [10, 16, 27, 46, 77, 129, 215, 359, 599, 1000],
}


def independent_counts(n, num_classes, rho):
  """The profile written out again with explicit loops (no library code)."""
  out = []
  for c in range(num_classes):
    if rho >= 1:
      out.append(int(n * (1.0 / rho) ** (c / (num_classes - 1))))
    else:
      out.append(int(n * rho ** ((num_classes - 1 - c) / (num_classes - 1))))
  return out


@pytest.mark.parametrize("rho", sorted(CIFAR10_TEST_COUNTS))
def test_shifted_counts_match_hand_values(rho):
  assert posthoc.shifted_counts(1000, 10, rho).tolist() == CIFAR10_TEST_COUNTS[rho]


@pytest.mark.parametrize("rho", [100, 10, 1, 0.1, 0.01])
@pytest.mark.parametrize("num_classes,n", [(10, 1000), (100, 100), (7, 33)])
def test_resampled_set_has_requested_counts(rho, num_classes, n):
  rng = np.random.RandomState(1)
  labels = rng.permutation(np.repeat(np.arange(num_classes), n))
  idx = posthoc.resample_test_set(labels, rho, num_classes, seed=0)
  counts = np.bincount(labels[idx], minlength=num_classes)
  assert counts.tolist() == independent_counts(n, num_classes, rho)
  assert len(np.unique(idx)) == len(idx)  # Without replacement.
  np.testing.assert_array_equal(idx, np.sort(idx))


def test_resampling_is_seeded_and_rho_one_keeps_everything():
  labels = np.repeat(np.arange(10), 50)
  a = posthoc.resample_test_set(labels, 10, 10, seed=0)
  np.testing.assert_array_equal(a, posthoc.resample_test_set(labels, 10, 10, seed=0))
  assert not np.array_equal(a, posthoc.resample_test_set(labels, 10, 10, seed=1))
  np.testing.assert_array_equal(posthoc.resample_test_set(labels, 1, 10), np.arange(500))


def test_resampled_cifar10_test_sets(cifar10_file):
  """Table D2's test sets on the real CIFAR-10 test labels."""
  with np.load(cifar10_file, allow_pickle=False) as archive:
    labels = archive["test_labels"]
  for rho, expected in CIFAR10_TEST_COUNTS.items():
    idx = posthoc.resample_test_set(labels, rho, 10, seed=0)
    assert np.bincount(labels[idx], minlength=10).tolist() == expected


def test_test_prior_spec_is_the_resampled_prior():
  spec = posthoc.test_prior_spec(100, 10)
  assert spec == ",".join(map(str, CIFAR10_TEST_COUNTS[100]))
  prior = losses.parse_test_prior(spec, 10)
  np.testing.assert_allclose(prior, np.array(CIFAR10_TEST_COUNTS[100]) / 2478)


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(t_true):
  rng = np.random.RandomState(0)
  z = 2.0 * rng.randn(20000, 10)  # Calibrated logits: y ~ softmax(z).
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = (p.cumsum(1) > rng.rand(len(z), 1)).argmax(1)
  observed = z * t_true  # Over-confident (T > 1) or under-confident (T < 1).
  t_hat = posthoc.fit_temperature(observed, labels)
  assert abs(t_hat - t_true) / t_true < 0.05
  assert posthoc.fit_temperature(observed, labels) == t_hat  # Deterministic.
  np.testing.assert_allclose(posthoc.apply_temperature(observed, t_hat), observed / t_hat)


def test_prior_correction_equals_hand_computed_posterior():
  # One input x with class likelihoods p(x|y) = (0.2, 0.5, 0.3).
  # Train prior (0.7, 0.2, 0.1): posterior proportional to (0.14, 0.10, 0.03),
  # argmax 0. Test prior (0.1, 0.3, 0.6): proportional to (0.02, 0.15, 0.18),
  # i.e. (2, 15, 18) / 35, argmax 2.
  likelihood = np.array([0.2, 0.5, 0.3])
  train, test = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
  expected = np.array([2, 15, 18]) / 35
  ce_logits = np.log(likelihood * train)[None] + 3.0  # Any constant offset.
  assert ce_logits.argmax() == 0
  corrected = posthoc.prior_correction(ce_logits, np.log(train), np.log(test))
  probs = np.exp(corrected - corrected.max())
  np.testing.assert_allclose(probs / probs.sum(), expected[None], atol=1e-12)
  assert corrected.argmax() == 2
  # A Bayias model's raw logits estimate the posterior under the uniform prior.
  bayias_logits = np.log(likelihood / 3)[None]
  corrected = posthoc.prior_correction(bayias_logits, np.log(np.full(3, 1 / 3)),
                                       np.log(test))
  probs = np.exp(corrected - corrected.max())
  np.testing.assert_allclose(probs / probs.sum(), expected[None], atol=1e-12)


def test_reference_prior_follows_the_loss():
  train = np.array([0.7, 0.2, 0.1])
  ce = ml_collections.ConfigDict({"name": "ce", "test_prior": "uniform"})
  uniform = ml_collections.ConfigDict({"name": "bayias", "test_prior": "uniform"})
  shifted = ml_collections.ConfigDict({"name": "bayias", "test_prior": "1,2,7"})
  np.testing.assert_allclose(posthoc.reference_log_prior(ce, train), np.log(train))
  np.testing.assert_allclose(posthoc.reference_log_prior(uniform, train), np.log([1 / 3] * 3))
  np.testing.assert_allclose(posthoc.reference_log_prior(shifted, train),
                             np.log([0.1, 0.2, 0.7]))
  assert posthoc.reference_log_prior(ml_collections.ConfigDict({"name": "focal"}), train) is None
  drw = ml_collections.ConfigDict({"name": "ce", "schedule": "drw"})
  assert posthoc.reference_log_prior(drw, train) is None
  # Class-balanced batches (a second stage): CE and LAS refer to the uniform
  # prior; Bayias to q pi_t / pi_train = (1/3)(1/3) / pi, i.e. proportional to
  # 1 / pi = (1.4286, 5, 10) / 16.4286 = (0.08696, 0.30435, 0.60870).
  for name in ("ce", "las"):
    np.testing.assert_allclose(posthoc.reference_log_prior(
        ml_collections.ConfigDict({"name": name}), train, "class_balanced"), np.log([1 / 3] * 3))
  np.testing.assert_allclose(
      np.exp(posthoc.reference_log_prior(uniform, train, "class_balanced")),
      [0.08696, 0.30435, 0.60870], atol=1e-5)
  # Logit adjustment (tau 1) on the random sampler: pi / pi = uniform.
  adjusted = ml_collections.ConfigDict({"name": "logit_adjusted", "la_tau": 1.0})
  np.testing.assert_allclose(posthoc.reference_log_prior(adjusted, train), np.log([1 / 3] * 3))


def test_prior_correction_helps_on_shifted_gaussian_data():
  """Bayes-optimal correction beats raw logits when the test prior is reversed."""
  rng = np.random.RandomState(0)
  means = np.array([-1.0, 0.0, 1.0])
  train = np.array([0.8, 0.15, 0.05])
  labels = np.repeat(np.arange(3), [20, 200, 2000])  # Reversed test prior.
  x = means[labels] + rng.randn(len(labels))
  # Exact train posterior of unit-variance Gaussians: log N(x; mu_y, 1) + log pi_y.
  logits = -0.5 * (x[:, None] - means[None]) ** 2 + np.log(train)
  test = np.bincount(labels) / len(labels)
  corrected = posthoc.prior_correction(logits, np.log(train), np.log(test))
  raw_acc = np.mean(logits.argmax(1) == labels)
  assert np.mean(corrected.argmax(1) == labels) > raw_acc + 0.2
