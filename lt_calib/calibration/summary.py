"""Every metric of the paper's tables on a whole evaluation set, two ways.

`summarize(logits, labels, ...)` computes them from the logits in float64
(lt_calib/calibration/metrics.py defines each). `batch_statistics` computes,
under `jax.jit` and on a batch sharded over a mesh, sums from which the same
metrics follow (`metrics_from_statistics`): counts, per-class hits,
calibration bins, NLL and Brier sums add up exactly over batches, devices and
hosts, so an evaluation never needs a split's logits in one place. ACE and
TACE sort each class's predictions over the whole set: they need the logits
(`metrics.adaptive_calibration_errors`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lt_calib.calibration import metrics
from lt_calib.calibration.metrics import (bin_index, ece_from_bins, label_rank,
                                          mce_from_bins, safe_divide, sce_from_bins,
                                          shot_accuracy)


def _shared_metrics(per_class_acc, train_counts, top1_bins, class_bins):
  """Entries computed alike by `summarize` and `metrics_from_statistics`."""
  evaluated = per_class_acc[~np.isnan(per_class_acc)]
  return {
      "mean_class_acc": evaluated.mean() if evaluated.size else math.nan,
      **shot_accuracy(per_class_acc, train_counts),
      "ece": ece_from_bins(top1_bins),
      "mce": mce_from_bins(top1_bins),
      "sce": sce_from_bins(class_bins),
  }


def _json_ready(values: dict) -> dict:
  """Python floats and lists, NaN as None (JSON has no NaN)."""
  def clean(x):
    return None if math.isnan(float(x)) else float(x)
  return {k: [clean(v) for v in x] if np.ndim(x) else clean(x) for k, x in values.items()}


def summarize(logits, labels, train_counts, num_bins=15):
  """Every metric of the paper's tables on a whole evaluation set.

  Args:
    logits: [N, C].
    labels: int [N].
    train_counts: int [C] training images per class (shot groups).
    num_bins: M bins of ECE/MCE/SCE, also the R ranges of ACE/TACE.

  Returns:
    JSON-serialisable dict: top1, top5, mean_class_acc (over the classes
    present in `labels`), many_acc, medium_acc, few_acc, ece, mce, sce, ace,
    tace (epsilon 1e-3), brier (Eq. D.6), brier_sum (no 1/C, as Table D1),
    nll, and per_class_acc (list of C). Undefined values (an empty shot group,
    a class absent from `labels`) are None instead of NaN.
  """
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  probs = metrics.softmax(logits)
  pred = logits.argmax(axis=1)
  per_class = metrics.per_class_accuracy(pred, labels, logits.shape[1])
  top1_bins = metrics.calibration_bins(probs.max(axis=1), pred == labels, num_bins)
  return _json_ready({
      "top1": metrics.top_k_accuracy(logits, labels, 1),
      "top5": metrics.top_k_accuracy(logits, labels, 5),
      **_shared_metrics(per_class, train_counts, top1_bins,
                        metrics.classwise_calibration_bins(probs, labels, num_bins)),
      **dict(zip(("ace", "tace"),
                 metrics.adaptive_calibration_errors(logits, labels, num_bins))),
      "brier": metrics.brier_score(probs, labels, "mean"),
      "brier_sum": metrics.brier_score(probs, labels, "sum"),
      "nll": metrics.nll(logits, labels),
      "per_class_acc": per_class,
  })


def batch_statistics(logits, labels, num_classes, num_bins=15, mask=None):
  """Sums over one batch from which the metrics of `summarize` follow (jnp).

  No Python control flow on values: runs under `jax.jit` (`num_classes` and
  `num_bins` static), also on a batch sharded over a mesh, where the sums over
  the batch axis become all-reduces. Add the dicts of disjoint batches
  (`jax.tree.map(np.add, a, b)`) and pass the total to
  `metrics_from_statistics`: this matches `summarize` up to float rounding
  (the batch is processed in the logits' dtype, `summarize` in float64). ACE
  and TACE need the whole sorted set and are not available this way.

  Args:
    logits: [B, C].
    labels: int [B].
    num_classes: C.
    num_bins: M equal-width bins.
    mask: optional [B], 1 for real examples and 0 for padding; padded rows
      may hold anything (even NaN logits, label -1) and count for nothing.

  Returns:
    dict: int32 'count', 'top1_correct', 'top5_correct', 'class_count' [C],
    'class_correct' [C]; float 'nll_sum', 'brier_sum' (over examples and
    classes); 'ece_bins' ([M], as `calibration_bins`) and 'sce_bins'
    ([C, M], as `classwise_calibration_bins`).
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.shape[-1] != num_classes:
    raise ValueError(
        f"logits have {logits.shape[-1]} classes, expected {num_classes}.")
  valid = (jnp.ones(labels.shape, bool) if mask is None
           else jnp.asarray(mask).astype(bool))
  # Neutralise padding so every term below is finite and can be weighted out.
  logits = jnp.where(valid[:, None], logits, 0)
  labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  count, weight = valid.astype(jnp.int32), valid.astype(logits.dtype)

  log_probs = jax.nn.log_softmax(logits)
  probs = jnp.exp(log_probs)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)
  rank = label_rank(logits, labels, jnp)
  correct = (rank == 0).astype(jnp.int32) * count
  label_log_prob = jnp.take_along_axis(log_probs, labels[:, None], 1)[:, 0]

  # Bin membership as one-hot masks summed over the batch, not scatters: this
  # is deterministic and works on a batch sharded over a mesh with Explicit
  # axes (a scatter with sharded indices does not). The class-wise mask holds
  # B*C*M elements.
  bins = jnp.arange(num_bins)
  top1_in_bin = bin_index(probs.max(axis=1), num_bins, jnp)[:, None] == bins
  class_in_bin = bin_index(probs, num_bins, jnp)[..., None] == bins

  def per_bin(in_bin, values):  # sum over the batch of values * [in bin m]
    return jnp.sum(jnp.where(in_bin, values[..., None], 0), axis=0)

  return {
      "count": count.sum(),
      "top1_correct": correct.sum(),
      "top5_correct": ((rank < min(5, num_classes)) * count).sum(),
      "class_count": (onehot * count[:, None]).sum(axis=0),
      "class_correct": (onehot * correct[:, None]).sum(axis=0),
      "nll_sum": -(weight * label_log_prob).sum(),
      "brier_sum": (weight[:, None] * (onehot - probs) ** 2).sum(),
      "ece_bins": {
          "count": per_bin(top1_in_bin, count),
          "sum_confidence": per_bin(top1_in_bin, weight * probs.max(axis=1)),
          "sum_correct": per_bin(top1_in_bin, correct),
      },
      "sce_bins": {
          "count": per_bin(class_in_bin,
                           jnp.broadcast_to(count[:, None], probs.shape)),
          "sum_confidence": per_bin(class_in_bin, weight[:, None] * probs),
          "sum_correct": per_bin(class_in_bin, count[:, None] * onehot),
      },
  }


def metrics_from_statistics(stats, train_counts):
  """Metrics of `summarize` from `batch_statistics` summed over all batches.

  Args:
    stats: dict of `batch_statistics`, summed over batches and devices.
    train_counts: int [C] training images per class.

  Returns:
    The dict of `summarize` without 'ace' and 'tace'; None for undefined
    values.
  """
  s = jax.tree.map(lambda x: np.asarray(x, np.float64), stats)
  n = s["count"]
  per_class = safe_divide(s["class_correct"], s["class_count"])
  return _json_ready({
      "top1": safe_divide(s["top1_correct"], n),
      "top5": safe_divide(s["top5_correct"], n),
      **_shared_metrics(per_class, train_counts, s["ece_bins"],
                        s["sce_bins"]),
      "brier": safe_divide(s["brier_sum"], n * per_class.size),
      "brier_sum": safe_divide(s["brier_sum"], n),
      "nll": safe_divide(s["nll_sum"], n),
      "per_class_acc": per_class,
  })
