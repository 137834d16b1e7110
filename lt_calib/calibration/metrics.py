"""Accuracy and calibration metrics of Appendix D.2 (Eq. D.1-D.6).

Conventions:

* Inputs: logits or softmax probabilities [N, C], integer labels [N]. The
  NumPy functions work in float64; accuracies are fractions, not percentages.
* The prediction is the first index of the largest logit (`np.argmax`); top-k
  uses the same tie rule (the order of a stable descending sort).
* Equal-width bins (ECE, MCE, SCE): M bins closed on the right,
  B_m = ((m-1)/M, m/M], as in Guo et al. 2017 and the authors' evaluation code
  (`np.digitize(..., right=True)`). Bin index = clip(ceil(p*M) - 1, 0, M-1):
  p = 1.0 is in the last bin, an underflowed p = 0.0 in the first, and a value
  on an edge goes where the float rounding of p*M puts it.

Whole-set summaries (`summarize`, and the same from per-batch sums that
aggregate exactly over batches and devices) are in
lt_calib/calibration/summary.py.
"""

import math

import numpy as np

SHOT_GROUPS = ("many", "medium", "few")


def softmax(logits):
  """Numerically stable softmax over the last axis.

  Args:
    logits: [..., C].

  Returns:
    float64 [..., C] probabilities.
  """
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(axis=-1, keepdims=True))  # Cannot overflow.
  return e / e.sum(axis=-1, keepdims=True)


def safe_divide(num, den):
  """num / den, NaN where den == 0 (no warning)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  out = np.full(np.broadcast(num, den).shape, np.nan)
  return np.divide(num, den, out=out, where=den > 0)


def label_rank(scores, labels, xp):
  """Position of each label in a stable descending sort of its row.

  Counting instead of sorting is O(N*C), identical in NumPy (xp=np) and jnp,
  and rank 0 is exactly `argmax(scores) == label`.
  """
  label_score = xp.take_along_axis(scores, labels[:, None], axis=1)
  lower_index = xp.arange(scores.shape[1])[None, :] < labels[:, None]
  ahead = (scores > label_score) | ((scores == label_score) & lower_index)
  return ahead.sum(axis=1)


def top_k_accuracy(scores, labels, k=1):
  """Fraction of examples whose label is among their k highest scores.

  Args:
    scores: logits or probabilities [N, C].
    labels: int [N].
    k: clipped to C; ties rank the lower class index first.

  Returns:
    float in [0, 1].
  """
  scores = np.asarray(scores, np.float64)
  k = min(k, scores.shape[1])
  return float(np.mean(label_rank(scores, np.asarray(labels), np) < k))


def per_class_accuracy(pred, labels, num_classes):
  """acc_c = #{i: y_i = c, pred_i = c} / #{i: y_i = c}.

  Args:
    pred: int [N] predicted classes.
    labels: int [N] true classes.
    num_classes: C.

  Returns:
    float64 [C], NaN for a class absent from `labels`.
  """
  pred, labels = np.asarray(pred), np.asarray(labels)
  hits = np.bincount(labels, weights=pred == labels, minlength=num_classes)
  return safe_divide(hits, np.bincount(labels, minlength=num_classes))


def shot_groups(train_counts, many_threshold=100, few_threshold=20):
  """Many/medium/few-shot class masks.

  Args:
    train_counts: int [C] training images per class.
    many_threshold: many-shot classes have more images than this.
    few_threshold: few-shot classes have fewer images than this.

  Returns:
    dict of bool [C] masks: 'many' (n > 100), 'medium' (20 <= n <= 100) and
    'few' (n < 20) with the default thresholds.
  """
  n = np.asarray(train_counts)
  many, few = n > many_threshold, n < few_threshold
  return {"many": many, "medium": ~many & ~few, "few": few}


def shot_accuracy(per_class_acc, train_counts, many_threshold=100,
                  few_threshold=20):
  """Mean per-class accuracy over the classes of each shot group.

  Args:
    per_class_acc: float [C], NaN for classes absent from the test labels
      (such classes are skipped).
    train_counts: int [C] training images per class.
    many_threshold: see `shot_groups`.
    few_threshold: see `shot_groups`.

  Returns:
    dict 'many_acc', 'medium_acc', 'few_acc'; NaN for a group with no
    evaluated class (e.g. no class of CIFAR-10-LT-10 is few-shot).
  """
  acc = np.asarray(per_class_acc, np.float64)
  groups = shot_groups(train_counts, many_threshold, few_threshold)
  out = {}
  for name in SHOT_GROUPS:
    values = acc[groups[name] & ~np.isnan(acc)]
    out[f"{name}_acc"] = float(values.mean()) if values.size else math.nan
  return out


def bin_index(confidence, num_bins, xp):
  """Right-closed equal-width bin of each confidence (module docstring)."""
  index = xp.ceil(confidence * num_bins).astype(xp.int32) - 1
  return xp.clip(index, 0, num_bins - 1)


def calibration_bins(confidence, correct, num_bins=15):
  """Per-bin sums over M equal-width confidence bins.

  Sums rather than means, so the bins of disjoint batches simply add up.

  Args:
    confidence: float [N], e.g. the top softmax probability.
    correct: bool or 0/1 [N], whether each prediction is right.
    num_bins: M.

  Returns:
    dict of [M] arrays: 'count' |B_m|, 'sum_confidence' (sum of confidences
    in B_m) and 'sum_correct' (number of right predictions in B_m).
  """
  confidence = np.asarray(confidence, np.float64)
  index = bin_index(confidence, num_bins, np)
  correct = np.asarray(correct, np.float64)
  return {"count": np.bincount(index, minlength=num_bins),
          "sum_confidence": np.bincount(index, confidence, num_bins),
          "sum_correct": np.bincount(index, correct, num_bins)}


def ece_from_bins(bins):
  """ECE = sum_m |B_m|/n |acc(B_m) - cfd(B_m)| (Eq. D.2).

  |B_m| |acc - cfd| = |sum_correct - sum_confidence|, so this is
  sum_m |sum_correct_m - sum_confidence_m| / n over the last axis; [C, M]
  class-wise bins give one value per class.

  Args:
    bins: dict from `calibration_bins` or `batch_statistics`.

  Returns:
    ECE (a [C] array for class-wise bins); NaN when every bin is empty.
  """
  gap = np.abs(np.asarray(bins["sum_correct"], np.float64)
               - np.asarray(bins["sum_confidence"], np.float64))
  return safe_divide(gap.sum(-1), np.sum(bins["count"], -1))[()]


def reliability_from_bins(bins):
  """acc(B_m) and cfd(B_m) of Eq. D.1 per bin, for reliability diagrams.

  Args:
    bins: dict from `calibration_bins` or `batch_statistics`.

  Returns:
    dict of float64 arrays: 'accuracy', 'confidence' [M] (NaN for empty bins),
    'count' [M] and 'edges' [M + 1] (bin m is (edges[m], edges[m + 1]]).
  """
  count = np.asarray(bins["count"], np.float64)
  return {"accuracy": safe_divide(bins["sum_correct"], count),
          "confidence": safe_divide(bins["sum_confidence"], count),
          "count": count,
          "edges": np.linspace(0.0, 1.0, count.shape[-1] + 1)}


def mce_from_bins(bins):
  """MCE = max_m |acc(B_m) - cfd(B_m)| over the non-empty bins (Eq. D.3).

  Args:
    bins: dict from `calibration_bins` or `batch_statistics`.

  Returns:
    float; NaN when every bin is empty.
  """
  rel = reliability_from_bins(bins)
  if not np.any(rel["count"] > 0):
    return math.nan
  return float(np.nanmax(np.abs(rel["accuracy"] - rel["confidence"])))


def _top1_bins(probs, labels, num_bins):
  probs = np.asarray(probs, np.float64)
  correct = probs.argmax(axis=1) == np.asarray(labels)
  return calibration_bins(probs.max(axis=1), correct, num_bins)


def expected_calibration_error(probs, labels, num_bins=15):
  """ECE (Eq. D.2) of the top-1 prediction of softmax `probs` [N, C]."""
  return float(ece_from_bins(_top1_bins(probs, labels, num_bins)))


def max_calibration_error(probs, labels, num_bins=15):
  """MCE (Eq. D.3) of the top-1 prediction of softmax `probs` [N, C]."""
  return mce_from_bins(_top1_bins(probs, labels, num_bins))


def classwise_calibration_bins(probs, labels, num_bins=15):
  """`calibration_bins` of p[:, c] against 1(y = c) for every class c.

  Args:
    probs: softmax probabilities [N, C].
    labels: int [N].
    num_bins: M.

  Returns:
    dict of [C, M] arrays 'count', 'sum_confidence', 'sum_correct'.
  """
  probs = np.asarray(probs, np.float64)
  n, num_classes = probs.shape
  hits = np.asarray(labels)[:, None] == np.arange(num_classes)
  # One bincount over (class, bin) pairs rather than a loop over classes.
  pair = (bin_index(probs, num_bins, np)
          + num_bins * np.arange(num_classes)).ravel()
  def total(weights):
    return np.bincount(pair, weights, num_classes * num_bins).reshape(
        num_classes, num_bins)
  return {"count": total(None), "sum_confidence": total(probs.ravel()),
          "sum_correct": total(hits.ravel().astype(np.float64))}


def sce_from_bins(class_bins):
  """SCE = 1/C sum_c sum_b n_bc/N |acc(B_b, c) - cfd(B_b, c)| (Eq. D.5).

  Static Calibration Error of Nixon et al. 2019, "Measuring calibration in
  deep learning". Each class's bins hold all N examples, so the inner sum is
  `ece_from_bins` of that class's row.

  Args:
    class_bins: [C, M] dict from `classwise_calibration_bins` or
      `batch_statistics`.

  Returns:
    float.
  """
  return float(np.mean(ece_from_bins(class_bins)))


def static_calibration_error(probs, labels, num_bins=15):
  """SCE (Eq. D.5) of softmax `probs` [N, C]; see `sce_from_bins`."""
  return sce_from_bins(classwise_calibration_bins(probs, labels, num_bins))


def adaptive_calibration_error(probs, labels, num_ranges=15, threshold=0.0):
  """ACE, or TACE for threshold > 0 (Eq. D.4; Nixon et al. 2019).

  For each class c: keep the p[i, c] >= threshold, sort them (stable), split
  the sorted order into R ranges of equal count with `np.array_split` (sizes
  differ by at most one, larger ranges first), and in each range take
  |acc - cfd|, acc being the fraction with y = c and cfd the mean p[:, c].
  The result is the mean of these gaps over the non-empty (c, r) ranges,
  i.e. exactly 1/(CR) sum_c sum_r when every class keeps >= R predictions;
  empty ranges (a class with fewer than R kept predictions) are left out of
  the count rather than counted as zero. (Nixon et al.'s code instead weights
  each range by its share of the class's predictions, keeps p > threshold and
  counts a class with no kept prediction as 0.) The ranges depend on the
  whole sorted set, so this does not decompose over batches.

  Args:
    probs: softmax probabilities [N, C].
    labels: int [N].
    num_ranges: R; the paper does not state it.
    threshold: epsilon; 0 gives ACE, the paper's TACE uses 1e-3.

  Returns:
    float; NaN if no probability reaches the threshold.
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  gaps = _adaptive_gaps(probs, labels, 0, num_ranges, threshold)
  return float(np.mean(gaps)) if gaps else math.nan


def _adaptive_gaps(probs, labels, first_class, num_ranges, threshold) -> list:
  """The |acc - cfd| of every non-empty range of the classes in `probs`'s columns."""
  gaps = []
  for j in range(probs.shape[1]):
    keep = probs[:, j] >= threshold
    order = np.argsort(probs[keep, j], kind="stable")
    confidence, hit = probs[keep, j][order], (labels[keep] == first_class + j)[order]
    for conf_r, hit_r in zip(np.array_split(confidence, num_ranges),
                             np.array_split(hit, num_ranges)):
      if conf_r.size:
        gaps.append(abs(hit_r.mean() - conf_r.mean()))
  return gaps


def adaptive_calibration_errors(logits, labels, num_ranges=15, threshold=1e-3,
                                chunk=256) -> tuple:
  """(ACE, TACE) of `adaptive_calibration_error` straight from logits.

  The softmax is formed a block of `chunk` classes at a time (float64), so
  memory stays at N x chunk beside the logits: 24,426 x 8,142 iNaturalist
  logits need no N x C float64 copy.

  Args:
    logits: [N, C] (any float dtype).
    labels: int [N].
    num_ranges: R.
    threshold: TACE's epsilon.
    chunk: classes per block.

  Returns:
    (ace, tace) floats (NaN where nothing is kept).
  """
  logits, labels = np.asarray(logits), np.asarray(labels)
  top = logits.max(axis=1).astype(np.float64)
  log_norm = top + np.log(sum(
      np.exp(logits[:, k:k + chunk].astype(np.float64) - top[:, None]).sum(axis=1)
      for k in range(0, logits.shape[1], chunk)))
  ace, tace = [], []
  for k in range(0, logits.shape[1], chunk):
    probs = np.exp(logits[:, k:k + chunk].astype(np.float64) - log_norm[:, None])
    ace += _adaptive_gaps(probs, labels, k, num_ranges, 0.0)
    tace += _adaptive_gaps(probs, labels, k, num_ranges, threshold)
  return (float(np.mean(ace)) if ace else math.nan,
          float(np.mean(tace)) if tace else math.nan)


def brier_score(probs, labels, reduce_classes="mean"):
  """BS = 1/(NC) sum_i sum_c (1(y_i = c) - p_ic)^2 (Eq. D.6).

  Many papers drop the 1/C (BS in [0, 2]); judging by its magnitudes (53.61
  for CIFAR-10-LT), so does the paper's Table D1 (x100). Pass
  `reduce_classes='sum'` for that convention.

  Args:
    probs: softmax probabilities [N, C].
    labels: int [N].
    reduce_classes: 'mean' (Eq. D.6) or 'sum' over classes.

  Returns:
    float.
  """
  if reduce_classes not in ("mean", "sum"):
    raise ValueError(
        f"reduce_classes must be 'mean' or 'sum', got {reduce_classes!r}.")
  probs = np.asarray(probs, np.float64)
  onehot = np.asarray(labels)[:, None] == np.arange(probs.shape[1])
  per_example = np.sum((onehot - probs) ** 2, axis=1)
  classes = probs.shape[1] if reduce_classes == "mean" else 1
  return float(np.mean(per_example)) / classes


def nll(logits, labels):
  """Mean negative log-likelihood, -1/N sum_i log softmax(z_i)[y_i].

  Computed as logsumexp(z_i) - z_i[y_i] so that a confidently wrong
  prediction costs its true loss, not that of a clipped probability.

  Args:
    logits: [N, C].
    labels: int [N].

  Returns:
    float.
  """
  z = np.asarray(logits, np.float64)
  top = z.max(axis=1)
  logsumexp = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
  label_logit = np.take_along_axis(z, np.asarray(labels)[:, None], 1)[:, 0]
  return float(np.mean(logsumexp - label_logit))
