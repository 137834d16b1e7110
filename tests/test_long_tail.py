"""CIFAR-LT construction against the reference rule, recomputed here with NumPy."""

import numpy as np
import pytest

from lt_calib.data import long_tail, offline


def reference_counts(n_max, num_classes, rho):
  # Transcription of LDAM-DRW's get_img_num_per_cls ('exp').
  return [int(n_max * (1.0 / rho) ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def test_cifar10_rho100_counts_match_the_paper_setup():
  counts = long_tail.long_tail_counts(5000, 10, 100)
  assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  assert counts.sum() == 12406


@pytest.mark.parametrize("rho,total", [(100, 10847), (10, 19573), (50, 12608), (200, 9502)])
def test_cifar100_totals(rho, total):
  counts = long_tail.long_tail_counts(500, 100, rho)
  assert counts.tolist() == reference_counts(500, 100, rho)
  assert counts.sum() == total


def test_step_profile_and_balanced():
  assert long_tail.long_tail_counts(500, 4, 10, "step").tolist() == [500, 500, 50, 50]
  assert long_tail.long_tail_counts(500, 3, 1).tolist() == [500, 500, 500]


def reference_selection(labels, counts):
  # The reference builders: global seed 0, then np.random.shuffle per class.
  np.random.seed(0)
  expected = []
  for c, n_c in enumerate(counts):
    idx = np.where(labels == c)[0]
    np.random.shuffle(idx)
    expected.extend(idx[:n_c].tolist())
  return expected


def test_selected_indices_equal_the_global_seed_rule():
  labels = np.random.RandomState(7).randint(0, 10, size=5000)
  counts = long_tail.long_tail_counts(400, 10, 100)
  assert long_tail.select_long_tail(labels, counts, seed=0).tolist() == (
      reference_selection(labels, counts))


def test_selected_cifar10_images_are_the_standard_ones(cifar10_file):
  archive = offline.read_npz(cifar10_file)
  labels = archive["train_labels"]
  assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # Original order.
  counts = long_tail.long_tail_counts(5000, 10, 100)
  kept = long_tail.select_long_tail(labels, counts)
  assert kept.tolist() == reference_selection(labels, counts) and len(kept) == 12406


def test_prior_and_bad_inputs():
  prior = long_tail.class_prior(np.array([0, 0, 0, 1]), 2)
  np.testing.assert_allclose(prior.prior, [0.75, 0.25])
  np.testing.assert_allclose(prior.log_prior, np.log([0.75, 0.25]))
  with pytest.raises(ValueError, match="imbalance_ratio must be >= 1"):
    long_tail.long_tail_counts(500, 10, 0.5)
  with pytest.raises(ValueError, match="imbalance_type"):
    long_tail.long_tail_counts(500, 10, 10, "linear")
  with pytest.raises(ValueError, match=r"classes \[2\] have zero training images"):
    long_tail.class_prior(np.array([0, 1, 1]), 3)
  smoothed = long_tail.class_prior(np.array([0, 1, 1]), 3, zero_count_smoothing=1.0)
  np.testing.assert_allclose(smoothed.prior, [2 / 6, 3 / 6, 1 / 6])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    long_tail.class_prior(np.array([0, 2]), 2)
