"""Calibration and long-tail pictures (Matplotlib, Agg backend, PNG).

One function per picture; each takes arrays and an output path, so the same
code serves the end of training, `lt_calib.evaluate` and notebooks. Every
picture stays legible for 10, 100 and 1,000 classes: per-cell numbers and
per-class tick labels only up to `ANNOTATE_MAX_CLASSES`, ticks every k classes
beyond.
"""

import math

import matplotlib

matplotlib.use("Agg")  # Headless: no display on training hosts.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import scipy.stats  # pylint: disable=g-import-not-at-top,wrong-import-position

from lt_calib import storage  # pylint: disable=g-import-not-at-top,wrong-import-position
from lt_calib.calibration import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

ANNOTATE_MAX_CLASSES = 20
BLOCK_ABOVE = 200   # Confusion matrices of more classes are block-summed...
BLOCK_CELLS = 100   # ...to at most this many cells a side.
DPI = 120


def _save(fig, path):
  # Through storage, so a report can go to a gs:// workdir.
  with storage.as_path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
  plt.close(fig)


def _class_ticks(ax, num_classes, axis, names=None):
  """Every class ticked (with names) up to 20 classes, else ~10 ticks."""
  if num_classes <= ANNOTATE_MAX_CLASSES:
    ticks = np.arange(num_classes)
    labels = ([f"{t} {n}" for t, n in zip(ticks, names)] if names is not None
              else [str(t) for t in ticks])
  else:
    step = max(1, int(10 ** math.floor(math.log10(num_classes / 10))))
    step *= 1 if num_classes / step <= 12 else (2 if num_classes / step <= 24 else 5)
    ticks = np.arange(0, num_classes, step)
    labels = [str(t) for t in ticks]
  if axis == "x":
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=45 if names is not None else 0,
                       ha="right" if names is not None else "center")
  else:
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels)


def reliability_diagram(confidence, correct, path, num_bins=15, title="") -> float:
  """Accuracy per confidence bin against the diagonal (Fig. D3 style).

  Bars are acc(B_m) of the `metrics.calibration_bins` bins; the red hatched
  part between each bar top and the bin's mean confidence is the gap
  |acc - cfd| that ECE averages. A lower panel shows how many predictions
  fall in each bin (log scale).

  Args:
    confidence: float [N] top softmax probability.
    correct: bool [N].
    path: output PNG.
    num_bins: M (15 as Guo et al. and the paper).
    title: prefix of the title; the ECE is appended.

  Returns:
    The ECE drawn in the title.
  """
  bins = metrics.calibration_bins(confidence, correct, num_bins)
  rel = metrics.reliability_from_bins(bins)
  ece = float(metrics.ece_from_bins(bins))
  edges, width = rel["edges"], 1.0 / num_bins
  centers = edges[:-1] + width / 2
  filled = rel["count"] > 0
  acc = np.where(filled, rel["accuracy"], 0.0)
  conf = np.where(filled, rel["confidence"], 0.0)
  fig, (ax, ax_count) = plt.subplots(
      2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
  ax.bar(centers, acc, width=width, color="#4C72B0", edgecolor="black",
         linewidth=0.6, label="accuracy")
  # Unfilled hatching: readable both above a bar (over-confidence) and on top
  # of it (under-confidence); the black tick is the bin's mean confidence.
  ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width,
         facecolor="none", edgecolor="#C44E52", hatch="///", linewidth=0.8,
         label="gap |accuracy - confidence|")
  ax.hlines(conf[filled], (centers - width / 2)[filled], (centers + width / 2)[filled],
            color="black", linewidth=1.5, label="mean confidence of bin")
  ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
  ax.set_title(f"{title}\nECE = {100 * ece:.2f}% ({num_bins} bins)".strip())
  ax.legend(loc="upper left", fontsize=8)
  ax_count.bar(centers, rel["count"], width=width, color="gray", edgecolor="black",
               linewidth=0.5)
  ax_count.set_yscale("log")
  ax_count.set(xlim=(0, 1), xlabel="confidence (top softmax probability)",
               ylabel="predictions")
  _save(fig, path)
  return ece


def batch_confidence_accuracy(confidence, correct, batch_size=100, min_points=200,
                              seed=0) -> tuple:
  """Per-mini-batch (mean confidence, accuracy) pairs of Eq. D.1 / Fig. D2.

  The test set is shuffled (fixed seed) and cut into batches of `batch_size`;
  a small test set is reshuffled until there are >= `min_points` batches, so
  the density is estimated from enough (correlated) points.

  Returns:
    (cfd [B], acc [B]) float64 arrays.
  """
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  batch_size = max(1, min(batch_size, len(confidence)))
  per_pass = len(confidence) // batch_size
  passes = max(1, -(-min_points // max(per_pass, 1)))
  rng = np.random.RandomState(seed)
  cfd, acc = [], []
  for _ in range(passes):
    order = rng.permutation(len(confidence))[:per_pass * batch_size]
    cfd.append(confidence[order].reshape(per_pass, batch_size).mean(axis=1))
    acc.append(correct[order].reshape(per_pass, batch_size).mean(axis=1))
  return np.concatenate(cfd), np.concatenate(acc)


def confidence_accuracy_density(confidence, correct, path, batch_size=100, title="",
                                seed=0) -> None:
  """Joint density of mini-batch confidence vs accuracy (Fig. 1 / D2 style).

  Points (one per test mini-batch, `batch_confidence_accuracy`) and filled
  contours of their Gaussian KDE; a calibrated model lies on the red dotted
  y = x, an over-confident one below it.
  """
  cfd, acc = batch_confidence_accuracy(confidence, correct, batch_size, seed=seed)
  fig, ax = plt.subplots(figsize=(5, 5))
  lo = max(0.0, min(cfd.min(), acc.min()) - 0.05)
  hi = min(1.0, max(cfd.max(), acc.max()) + 0.05)
  try:
    kde = scipy.stats.gaussian_kde(np.stack([cfd, acc]))
    grid_x, grid_y = np.meshgrid(np.linspace(lo, hi, 120), np.linspace(lo, hi, 120))
    density = kde(np.stack([grid_x.ravel(), grid_y.ravel()])).reshape(grid_x.shape)
    # Levels from 5% of the peak, so the empty background stays white.
    ax.contourf(grid_x, grid_y, density, cmap="Blues",
                levels=np.linspace(0.05, 1.0, 11) * density.max())
  except (np.linalg.LinAlgError, ValueError):
    pass  # Degenerate points (e.g. all identical): the scatter alone remains.
  ax.scatter(cfd, acc, s=6, color="#1f3b73", alpha=0.5, label=f"batches of {batch_size}")
  ax.plot([0, 1], [0, 1], ":", color="red", linewidth=2, label="y = x")
  ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="mean confidence of batch",
         ylabel="accuracy of batch", aspect="equal")
  gap = float(np.mean(cfd - acc))
  ax.set_title(f"{title}\nmean(confidence - accuracy) = {100 * gap:+.2f}%".strip())
  ax.legend(loc="upper left", fontsize=8)
  _save(fig, path)


def confusion_matrix(pred, labels, num_classes) -> np.ndarray:
  """counts[t, p] = #{i: y_i = t, pred_i = p} (rows: true class)."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(pred, np.int64)
  return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def confusion_plot(counts, path, log=False, title="", class_names=None) -> None:
  """Confusion matrix with ground truth on x and prediction on y (Fig. 5 / D4).

  Above 200 classes the counts are summed over blocks of k = ceil(C / 100)
  consecutive classes (said in the title), so every cell is visible.
  Linear: each column (a true class) is normalised to fractions, so the
  diagonal is per-class recall whatever the class sizes. Log (Fig. D6-D7):
  log10(1 + count) of the raw counts, which keeps zero cells at 0 and makes
  the sparse off-diagonal mass of 100+ classes visible. Cells carry numbers
  only up to 20 classes.
  """
  counts = np.asarray(counts, np.float64)
  num_classes = counts.shape[0]
  # Beyond BLOCK_ABOVE classes a cell would be under a pixel and the picture
  # would show arbitrary samples of the matrix: sum blocks of k classes.
  k = -(-num_classes // BLOCK_CELLS) if num_classes > BLOCK_ABOVE else 1
  if k > 1:
    nb = -(-num_classes // k)
    padded = np.zeros((nb * k, nb * k))
    padded[:num_classes, :num_classes] = counts
    counts = padded.reshape(nb, k, nb, k).sum(axis=(1, 3))
  if log:
    values, bar_label = np.log10(1.0 + counts.T), "log10(1 + count)"
  else:
    totals = counts.sum(axis=1, keepdims=True)
    values = 100 * np.divide(counts, totals, out=np.zeros_like(counts),
                             where=totals > 0).T
    bar_label = "% of the true class"
  size = 6 if num_classes <= ANNOTATE_MAX_CLASSES else 8
  fig, ax = plt.subplots(figsize=(size + 1, size))
  span = counts.shape[0] * k - 0.5  # Axes stay in class units when k > 1.
  image = ax.imshow(values, cmap="Blues", origin="upper", interpolation="nearest",
                    vmin=0, vmax=None if log else 100, extent=(-0.5, span, span, -0.5))
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=bar_label)
  if num_classes <= ANNOTATE_MAX_CLASSES:
    top = values.max() if values.size else 1
    for p in range(num_classes):
      for t in range(num_classes):
        text = f"{values[p, t]:.1f}" if log else f"{values[p, t]:.0f}"
        ax.text(t, p, text, ha="center", va="center", fontsize=7,
                color="white" if values[p, t] > 0.6 * top else "black")
  _class_ticks(ax, num_classes, "x", class_names)
  _class_ticks(ax, num_classes, "y", class_names)
  ax.set(xlabel="ground truth (class 0 = most training images)", ylabel="predicted")
  kind = "log-confusion matrix" if log else "confusion matrix (%)"
  if k > 1:
    kind += f", cells = blocks of {k} classes"
  ax.set_title(f"{title} {kind}".strip())
  _save(fig, path)


def per_class_accuracy_plot(per_class_acc, train_counts, path, title="",
                            many_threshold=100, few_threshold=20) -> None:
  """Per-class test accuracy against training images (log x), Fig. 2 style.

  Colours are the shot groups of `metrics.shot_groups`; dashed lines mark
  their thresholds and each group's mean accuracy. Classes absent from the
  test labels (NaN) are left out.
  """
  acc = np.asarray(per_class_acc, np.float64)
  counts = np.maximum(np.asarray(train_counts, np.float64), 1)
  groups = metrics.shot_groups(train_counts, many_threshold, few_threshold)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = {"many": "#4C72B0", "medium": "#55A868", "few": "#C44E52"}
  size = 30 if len(acc) <= 100 else 8
  for name, mask in groups.items():
    keep = mask & ~np.isnan(acc)
    if not keep.any():
      continue
    ax.scatter(counts[keep], acc[keep], s=size, color=colors[name], alpha=0.8,
               label=f"{name} ({keep.sum()} classes, mean {100 * acc[keep].mean():.1f}%)")
    ax.hlines(acc[keep].mean(), counts[keep].min(), counts[keep].max(),
              color=colors[name], linestyles="--", linewidth=1)
  if len(acc) <= ANNOTATE_MAX_CLASSES:
    for c in np.where(~np.isnan(acc))[0]:
      ax.annotate(str(c), (counts[c], acc[c]), textcoords="offset points",
                  xytext=(4, 4), fontsize=8)
  for threshold in (few_threshold, many_threshold):
    if counts.min() <= threshold <= counts.max():
      ax.axvline(threshold, color="gray", linestyle=":", linewidth=1)
  ax.set_xscale("log")
  ax.set(ylim=(-0.03, 1.03), xlabel="training images of the class (log scale)",
         ylabel="test accuracy of the class")
  ax.set_title(f"{title} per-class accuracy vs training count".strip())
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  _save(fig, path)


def accuracy_against_test_rho(rows, path, title="") -> None:
  """Top-1 against the test imbalance rho' (log axis), one line per prior.

  Args:
    rows: `prior_table.rows` (prior, test_rho, top1).
    path: output PNG.
    title: the picture's title.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in dict.fromkeys(r["prior"] for r in rows):
    points = sorted((r["test_rho"], 100 * r["top1"]) for r in rows if r["prior"] == name)
    ax.plot(*zip(*points), marker="o", label=name)
  ax.set_xscale("log")
  ax.set_xlabel("test imbalance rho' (> 1 long-tailed, < 1 reversed)")
  ax.set_ylabel("top-1 (%)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _save(fig, path)
