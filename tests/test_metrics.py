"""Tests of lt_calib.calibration.metrics against hand-worked values and plain transcriptions.

The reference functions below (`ref_*`) transcribe Eq. D.2-D.6 of the paper
with explicit loops and comparisons, independently of the vectorised code.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.special
import sklearn.metrics

from lt_calib.calibration import metrics
from lt_calib.calibration import summary as summary_lib
from tests.helpers import xla_environment

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- references


def ref_bins(values, num_bins):
  """Bin m (0-based) holds m/M < v <= (m+1)/M; v = 0 joins bin 0."""
  members = []
  for m in range(num_bins):
    lo, hi = m / num_bins, (m + 1) / num_bins
    members.append([i for i, v in enumerate(values)
                    if lo < v <= hi or (m == 0 and v == 0)])
  return members


def ref_ece_mce(probs, labels, num_bins):
  n = len(labels)
  conf = [max(row) for row in probs]
  correct = [int(np.argmax(row) == y) for row, y in zip(probs, labels)]
  ece, mce = 0.0, 0.0
  for members in ref_bins(conf, num_bins):
    if not members:
      continue
    acc = sum(correct[i] for i in members) / len(members)
    cfd = sum(conf[i] for i in members) / len(members)
    ece += len(members) / n * abs(acc - cfd)  # Eq. D.2
    mce = max(mce, abs(acc - cfd))  # Eq. D.3
  return ece, mce


def ref_sce(probs, labels, num_bins):
  n, num_classes = probs.shape
  total = 0.0
  for c in range(num_classes):
    for members in ref_bins(list(probs[:, c]), num_bins):
      if members:
        acc = sum(labels[i] == c for i in members) / len(members)
        cfd = sum(probs[i, c] for i in members) / len(members)
        total += len(members) / n * abs(acc - cfd)
  return total / num_classes  # Eq. D.5


def ref_tace(probs, labels, num_ranges, threshold):
  """Eq. D.4 literally: 1/(CR) sum over classes and equal-count ranges."""
  n, num_classes = probs.shape
  total = 0.0
  for c in range(num_classes):
    kept = sorted(((probs[i, c], labels[i] == c) for i in range(n)
                   if probs[i, c] >= threshold), key=lambda t: t[0])
    assert len(kept) >= num_ranges, "every range must be non-empty here"
    start = 0
    for r in range(num_ranges):
      # The first len % R ranges get one extra element.
      size = len(kept) // num_ranges + (r < len(kept) % num_ranges)
      chunk = kept[start:start + size]
      start += size
      acc = sum(hit for _, hit in chunk) / size
      cfd = sum(p for p, _ in chunk) / size
      total += abs(acc - cfd)
  return total / (num_classes * num_ranges)


def ref_brier(probs, labels):
  n, num_classes = probs.shape
  total = 0.0
  for i in range(n):
    for c in range(num_classes):
      total += (float(labels[i] == c) - probs[i, c]) ** 2
  return total / (n * num_classes)  # Eq. D.6


def random_problem(seed, n=400, num_classes=10, scale=3.0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  logits = rng.normal(size=(n, num_classes)) * scale
  # Make the model better than chance so bins hold both hits and misses.
  logits[np.arange(n), labels] += 2.0
  return logits, labels


# ------------------------------------------------------- hand-worked values


def test_perfect_calibration_gives_zero_ece_and_mce():
  # Bin of 0.75: 4 examples, 3 right. Bin of 0.55: 20 examples, 11 right.
  # Bin of 0.9: 10 examples, 9 right. acc == cfd in every bin.
  rows, labels = [], []
  for conf, n, n_right in [(0.75, 4, 3), (0.55, 20, 11), (0.9, 10, 9)]:
    rest = (1 - conf) / 3
    for i in range(n):
      rows.append([conf, rest, rest, rest])
      labels.append(0 if i < n_right else 1)
  probs = np.array(rows)
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(
      0.0, abs=1e-12)
  assert metrics.max_calibration_error(probs, labels) == pytest.approx(
      0.0, abs=1e-12)


def test_constant_confidence():
  # All top probabilities 0.9, 6 of 10 right: one bin, gap |0.6 - 0.9|.
  probs = np.tile([0.9, 0.05, 0.05], (10, 1))
  labels = [0] * 6 + [2] * 4
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.3)
  assert metrics.max_calibration_error(probs, labels) == pytest.approx(0.3)


def test_two_bins_by_hand():
  # M = 2: bins (0, 0.5] and (0.5, 1].
  # Bin 0: conf 0.3, 0.4 -> cfd 0.35, acc 1/2, gap 0.15, weight 2/5.
  # Bin 1: conf 0.8, 0.9, 0.7 -> cfd 0.8, acc 2/3, gap 2/15, weight 3/5.
  # ECE = 2/5 * 0.15 + 3/5 * 2/15 = 0.06 + 0.08 = 0.14; MCE = 0.15.
  bins = metrics.calibration_bins(
      [0.3, 0.4, 0.8, 0.9, 0.7], [0, 1, 1, 1, 0], num_bins=2)
  np.testing.assert_array_equal(bins["count"], [2, 3])
  assert metrics.ece_from_bins(bins) == pytest.approx(0.14)
  assert metrics.mce_from_bins(bins) == pytest.approx(0.15)
  rel = metrics.reliability_from_bins(bins)
  np.testing.assert_allclose(rel["accuracy"], [0.5, 2 / 3])
  np.testing.assert_allclose(rel["confidence"], [0.35, 0.8])
  np.testing.assert_allclose(rel["edges"], [0.0, 0.5, 1.0])


def test_bin_edges_are_right_closed():
  # 0.5 is the upper edge of bin 0 with M = 2; 1.0 is in the last bin and an
  # underflowed 0.0 in the first.
  bins = metrics.calibration_bins([0.5, 1.0, 0.0, 0.51], [1, 1, 0, 0], 2)
  np.testing.assert_array_equal(bins["count"], [2, 2])
  np.testing.assert_array_equal(bins["sum_correct"], [1, 1])


def test_mce_ignores_empty_bins_and_empty_input_is_nan():
  bins = metrics.calibration_bins([0.95] * 4, [1, 1, 1, 1], num_bins=15)
  assert metrics.mce_from_bins(bins) == pytest.approx(0.05)
  empty = metrics.calibration_bins([], [], num_bins=15)
  assert np.isnan(metrics.ece_from_bins(empty))
  assert np.isnan(metrics.mce_from_bins(empty))


def test_tace_and_ace_by_hand():
  probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
  labels = [0, 1, 1]
  # threshold 0.5, R = 2. Class 0 keeps 0.8 (y=1), 0.9 (y=0): ranges [0.8],
  # [0.9] give |0 - 0.8| and |1 - 0.9|. Class 1 keeps 0.7 (y=1): ranges [0.7]
  # with gap 0.3 and an empty one, left out. (0.8 + 0.1 + 0.3) / 3 = 0.4.
  assert metrics.adaptive_calibration_error(
      probs, labels, num_ranges=2, threshold=0.5) == pytest.approx(0.4)
  # ACE, R = 2. Class 0: [0.3 (y=1), 0.8 (y=1)] -> |0 - 0.55|; [0.9 (y=0)] ->
  # 0.1. Class 1: [0.1 (y=0), 0.2 (y=1)] -> |0.5 - 0.15|; [0.7 (y=1)] -> 0.3.
  # (0.55 + 0.1 + 0.35 + 0.3) / 4 = 0.325.
  assert metrics.adaptive_calibration_error(
      probs, labels, num_ranges=2) == pytest.approx(0.325)


def test_per_class_accuracy_and_absent_class():
  acc = metrics.per_class_accuracy(
      pred=[0, 0, 1, 2, 2, 0], labels=[0, 0, 1, 1, 2, 2], num_classes=4)
  np.testing.assert_allclose(acc[:3], [1.0, 0.5, 0.5])
  assert np.isnan(acc[3])


def test_shot_groups_boundaries():
  groups = metrics.shot_groups([500, 101, 100, 20, 19, 5])
  np.testing.assert_array_equal(groups["many"], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(groups["medium"], [0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(groups["few"], [0, 0, 0, 0, 1, 1])


def test_shot_accuracy_skips_nan_and_flags_empty_group():
  counts = [500, 101, 100, 20, 19, 5]
  acc = metrics.shot_accuracy([1.0, 0.5, 0.2, 0.4, 0.0, np.nan], counts)
  assert acc["many_acc"] == pytest.approx(0.75)
  assert acc["medium_acc"] == pytest.approx(0.3)
  assert acc["few_acc"] == pytest.approx(0.0)
  only_many = metrics.shot_accuracy([0.5, 0.7], [300, 200])
  assert only_many["many_acc"] == pytest.approx(0.6)
  assert np.isnan(only_many["medium_acc"]) and np.isnan(only_many["few_acc"])


def test_nll_uses_logits_not_clipped_probabilities():
  # softmax([1000, 0])[1] underflows to 0; -log of it is exactly 1000.
  assert metrics.nll([[1000.0, 0.0]], [1]) == pytest.approx(1000.0)


def test_brier_binary_matches_sklearn_and_sum_convention():
  rng = np.random.default_rng(3)
  p1 = rng.uniform(size=50)
  labels = rng.integers(0, 2, 50)
  probs = np.stack([1 - p1, p1], axis=1)
  # With C = 2, Eq. D.6 = 1/(2N) sum 2 (y - p1)^2 = sklearn's mean (y - p1)^2.
  expected = sklearn.metrics.brier_score_loss(labels, p1)
  assert metrics.brier_score(probs, labels) == pytest.approx(expected)
  assert metrics.brier_score(probs, labels, "sum") == pytest.approx(
      2 * expected)
  with pytest.raises(ValueError):
    metrics.brier_score(probs, labels, "max")


def test_topk_clips_k_to_num_classes():
  assert metrics.top_k_accuracy([[0.1, 0.2, 0.7]], [0], k=5) == 1.0


# ------------------------------------------------ random data vs references


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_metrics_match_reference(seed):
  logits, labels = random_problem(seed)
  probs = scipy.special.softmax(logits, axis=1)
  ece, mce = ref_ece_mce(probs, labels, 15)
  assert metrics.expected_calibration_error(probs, labels) == pytest.approx(ece)
  assert metrics.max_calibration_error(probs, labels) == pytest.approx(mce)
  assert metrics.static_calibration_error(probs, labels) == pytest.approx(
      ref_sce(probs, labels, 15))
  assert metrics.brier_score(probs, labels) == pytest.approx(
      ref_brier(probs, labels))
  assert metrics.adaptive_calibration_error(probs, labels, 15) == (
      pytest.approx(ref_tace(probs, labels, 15, 0.0)))
  assert metrics.adaptive_calibration_error(
      probs, labels, 15, threshold=1e-3) == pytest.approx(
          ref_tace(probs, labels, 15, 1e-3))


def test_softmax_nll_topk_match_scipy_and_sort():
  logits, labels = random_problem(4, n=300, num_classes=20)
  np.testing.assert_allclose(metrics.softmax(logits),
                             scipy.special.softmax(logits, axis=1), rtol=1e-12)
  log_p = scipy.special.log_softmax(logits, axis=1)
  assert metrics.nll(logits, labels) == pytest.approx(
      -np.mean(log_p[np.arange(len(labels)), labels]))
  order = np.argsort(-logits, axis=1, kind="stable")
  for k in (1, 5):
    expected = np.mean([y in row[:k] for row, y in zip(order, labels)])
    assert metrics.top_k_accuracy(logits, labels, k) == pytest.approx(expected)


def test_summarize_is_json_ready_with_none_for_nan():
  logits, labels = random_problem(5, n=200, num_classes=4)
  out = summary_lib.summarize(logits, labels, train_counts=[500, 300, 200, 150])
  json.dumps(out, allow_nan=False)
  assert out["medium_acc"] is None and out["few_acc"] is None
  assert out["top1"] == pytest.approx(
      np.mean(logits.argmax(axis=1) == labels))
  assert len(out["per_class_acc"]) == 4


# ------------------------------------------ exact aggregation over batches


def _reference_summary(logits, labels, train_counts):
  full = summary_lib.summarize(logits, labels, train_counts)
  del full["ace"], full["tace"]  # Not sum-decomposable.
  return full


def _assert_same_metrics(got, want):
  assert got.keys() == want.keys()
  for key, value in want.items():
    if value is None:
      assert got[key] is None, key
    else:
      np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7,
                                 err_msg=key)


TRAIN_COUNTS = [500, 300, 150, 101, 100, 60, 20, 19, 10, 5, 2, 1]


def test_batch_statistics_sum_matches_summarize():
  logits, labels = random_problem(6, n=1003, num_classes=12)
  logits = logits.astype(np.float32)
  stats_fn = jax.jit(summary_lib.batch_statistics,
                     static_argnames=("num_classes", "num_bins"))
  total, batch = None, 256
  for start in range(0, len(labels), batch):
    z, y = logits[start:start + batch], labels[start:start + batch]
    pad = batch - len(y)
    # Garbage padding must not count: NaN logits and an out-of-range label.
    z = np.concatenate([z, np.full((pad, 12), np.nan, np.float32)])
    y = np.concatenate([y, np.full(pad, -1)])
    mask = np.arange(batch) < batch - pad
    stats = jax.tree.map(lambda x: np.asarray(x, np.float64),
                         stats_fn(z, y, num_classes=12, mask=mask))
    total = stats if total is None else jax.tree.map(np.add, total, stats)
  assert total["count"] == len(labels)
  _assert_same_metrics(summary_lib.metrics_from_statistics(total, TRAIN_COUNTS),
                       _reference_summary(logits, labels, TRAIN_COUNTS))


DEVICE_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from lt_calib.calibration import summary as summary_lib
from tests.helpers import xla_environment
assert len(jax.devices()) == 8, jax.devices()
rng = np.random.default_rng(7)
n, c, padded = 797, 12, 800
logits = np.zeros((padded, c), np.float32)
logits[:n] = rng.normal(size=(n, c)) * 3
labels = np.zeros(padded, np.int32)
labels[:n] = rng.integers(0, c, n)
mask = np.arange(padded) < n
mesh = jax.make_mesh((8,), ("data",))
shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
args = [jax.device_put(x, shard) for x in (logits, labels, mask)]
assert len(args[0].sharding.device_set) == 8
stats = jax.jit(lambda z, y, m: summary_lib.batch_statistics(z, y, c, mask=m))(
    *args)
print(json.dumps({"metrics": summary_lib.metrics_from_statistics(
    stats, json.loads(%r)), "logits": logits[:n].tolist(),
    "labels": labels[:n].tolist()}))
"""


@pytest.mark.slow  # Starts an 8-device process.
def test_sharded_batch_statistics_match_summarize():
  env = xla_environment(
      8, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run(
      [sys.executable, "-c", DEVICE_SCRIPT % json.dumps(TRAIN_COUNTS)],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  logits = np.array(out["logits"], np.float32)
  _assert_same_metrics(
      out["metrics"],
      _reference_summary(logits, np.array(out["labels"]), TRAIN_COUNTS))
