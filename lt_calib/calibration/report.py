"""Calibration report of one evaluation: PNGs + report.md (+ report.json).

`write_report` is what `lt_calib.evaluate` calls for any checkpoint and
`write_training_report` what training calls at its end; all numbers come from
`summary.summarize`. Matplotlib and SciPy (the 'analysis' extra) are imported
only when a report is written, so importing this module costs nothing on a
host without them, and the end-of-training report is then skipped with a
warning instead of failing the run.
"""

import json
import logging
from typing import Optional, Sequence

import numpy as np

from lt_calib import storage
from lt_calib.calibration import metrics
from lt_calib.calibration import summary as summary_lib

PICTURES = {
    "reliability.png": "Reliability diagram (15 bins): bars are the accuracy of "
                       "each confidence bin, hatched the gap to its mean confidence; "
                       "bars below the diagonal mean over-confidence.",
    "confidence_accuracy.png": "Joint density of mean confidence (x) and accuracy (y) "
                               "over shuffled test mini-batches (Fig. 1 / D2); a "
                               "calibrated model lies on the red y = x.",
    "confusion.png": "Confusion matrix, ground truth on x, prediction on y, each "
                     "true class normalised to 100% (Fig. 5 / D4-D5).",
    "log_confusion.png": "Log-confusion matrix, log10(1 + count) (Fig. D6-D7).",
    "per_class_accuracy.png": "Per-class test accuracy against training images "
                              "(log scale), coloured by shot group.",
}
TABLE_ROWS = ("top1", "top5", "mean_class_acc", "many_acc", "medium_acc", "few_acc",
              "ece", "mce", "sce", "ace", "tace", "brier", "brier_sum", "nll")
PERCENT = {"top1", "top5", "mean_class_acc", "many_acc", "medium_acc", "few_acc",
           "ece", "mce", "sce", "ace", "tace"}


def top_probability(logits, chunk=4096):
  """max_c softmax(z)_c of each row, 1 / sum_c exp(z_c - max z), in row blocks.

  Args:
    logits: [N, C].
    chunk: rows per block (memory: chunk x C float64).

  Returns:
    float64 [N].
  """
  logits = np.asarray(logits)
  out = np.empty(len(logits))
  for k in range(0, len(logits), chunk):
    z = logits[k:k + chunk].astype(np.float64)
    out[k:k + chunk] = 1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)
  return out


def _fmt(key, value):
  if value is None:
    return "n/a"
  return f"{100 * value:.2f}" if key in PERCENT else f"{value:.4f}"


def summary_table(columns: dict) -> str:
  """Markdown table of `summary.summarize` dicts, one column per entry.

  Accuracies and calibration errors are in %, Brier and NLL as fractions.
  """
  names = list(columns)
  lines = ["| metric | " + " | ".join(names) + " |",
           "| --- |" + " ---: |" * len(names)]
  for key in TABLE_ROWS:
    unit = " (%)" if key in PERCENT else ""
    lines.append(f"| {key}{unit} | "
                 + " | ".join(_fmt(key, columns[n].get(key)) for n in names) + " |")
  return "\n".join(lines)


def temperature_section(val_logits, val_labels, test_logits, test_labels, train_counts,
                        num_bins=15) -> dict:
  """Fits T on a validation split and summarises the test set with it.

  Args:
    val_logits, val_labels: the held-out validation split (never the test set).
    test_logits, test_labels: the evaluation set.
    train_counts: int [C].
    num_bins: M.

  Returns:
    dict: 'temperature', 'val_count_per_class' (list), 'val_nll_before'/'after'
    and 'summary' (`summary.summarize` of test_logits / T).
  """
  from lt_calib.calibration import posthoc  # pylint: disable=g-import-not-at-top
  val_labels = np.asarray(val_labels)
  temperature = posthoc.fit_temperature(val_logits, val_labels)
  num_classes = np.asarray(test_logits).shape[1]
  return {
      "temperature": temperature,
      "val_count_per_class": np.bincount(val_labels, minlength=num_classes).tolist(),
      "val_nll_before": metrics.nll(val_logits, val_labels),
      "val_nll_after": metrics.nll(posthoc.apply_temperature(val_logits, temperature),
                                   val_labels),
      "summary": summary_lib.summarize(posthoc.apply_temperature(test_logits, temperature),
                                   test_labels, train_counts, num_bins),
  }


def _draw_pictures(out, logits, labels, train_counts, summary, num_bins, title,
                   class_names, file_prefix) -> np.ndarray:
  """The PICTURES of raw logits into `out`; returns which predictions are right."""
  from lt_calib.calibration import plots  # pylint: disable=g-import-not-at-top
  pred, confidence = logits.argmax(axis=1), top_probability(logits)
  correct = pred == labels
  names = {k: file_prefix + k for k in PICTURES}
  plots.reliability_diagram(confidence, correct, out / names["reliability.png"],
                            num_bins, f"{title} raw".strip())
  plots.confidence_accuracy_density(confidence, correct,
                                    out / names["confidence_accuracy.png"], title=title)
  counts = plots.confusion_matrix(pred, labels, logits.shape[1])
  plots.confusion_plot(counts, out / names["confusion.png"], False, title, class_names)
  plots.confusion_plot(counts, out / names["log_confusion.png"], True, title, class_names)
  per_class = np.array([np.nan if a is None else a for a in summary["per_class_acc"]])
  plots.per_class_accuracy_plot(per_class, train_counts,
                                out / names["per_class_accuracy.png"], title)
  return correct


def write_report(workdir, logits, labels, train_counts, num_bins=15, title="",
                 extra_tables: Optional[Sequence[tuple]] = None,
                 temperature: Optional[dict] = None, class_names=None,
                 file_prefix="", extra_columns: Optional[dict] = None,
                 summary: Optional[dict] = None) -> dict:
  """Writes every picture, report.md and report.json to `workdir`.

  Args:
    workdir: output folder (created).
    logits: [N, C] raw test logits.
    labels: int [N].
    train_counts: int [C] training images per class.
    num_bins: M of the reliability diagram and ECE.
    title: heading of report.md and prefix of the picture titles.
    extra_tables: optional (heading, markdown text) sections appended.
    temperature: optional output of `temperature_section`: its calibrated
      metrics become a second column and a second reliability diagram is drawn.
    class_names: optional C names for the tick labels of <= 20 classes.
    file_prefix: prefix of every file name (several reports in one folder).
    extra_columns: optional {name: `summary.summarize` dict} shown beside the
      raw (and temperature-scaled) columns of the summary table.
    summary: `summary.summarize` of `logits` if already computed.

  Returns:
    The `summary.summarize` dict of the raw logits.
  """
  from lt_calib.calibration import plots, posthoc  # pylint: disable=g-import-not-at-top
  out = storage.as_path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  logits, labels = np.asarray(logits), np.asarray(labels)
  num_classes = logits.shape[1]
  if summary is None:
    summary = summary_lib.summarize(logits, labels, train_counts, num_bins)
  correct = _draw_pictures(out, logits, labels, train_counts, summary, num_bins, title,
                           class_names, file_prefix)
  names = {k: file_prefix + k for k in PICTURES}
  columns = {"raw": summary}
  pictures = [(names[k], v) for k, v in PICTURES.items()]
  if temperature is not None:
    t = temperature["temperature"]
    columns[f"temperature-scaled (T = {t:.3f})"] = temperature["summary"]
    scaled = top_probability(posthoc.apply_temperature(logits, t))
    ts_name = file_prefix + "reliability_temperature.png"
    plots.reliability_diagram(scaled, correct, out / ts_name, num_bins,
                              f"{title} temperature-scaled T={t:.3f}".strip())
    pictures.insert(1, (ts_name, "Reliability diagram after temperature scaling."))
  columns.update(extra_columns or {})

  sections = [f"# {title or 'Calibration report'}", "",
              f"{len(labels)} test images, {num_classes} classes; training counts "
              f"{int(np.min(train_counts))}..{int(np.max(train_counts))} per class. "
              "Metric definitions: `lt_calib/metrics.py` (Appendix D.2).", "",
              "## Summary", "", summary_table(columns), ""]
  if temperature is not None:
    sections += [f"Temperature T = {temperature['temperature']:.4f} fitted on a held-out "
                 "validation split of unused training-pool images (never the test set); "
                 f"images per class {temperature['val_count_per_class']}; validation NLL "
                 f"{temperature['val_nll_before']:.4f} -> {temperature['val_nll_after']:.4f}.",
                 ""]
  for heading, text in extra_tables or ():
    sections += [f"## {heading}", "", text, ""]
  sections += ["## Pictures", ""]
  for name, caption in pictures:
    sections += [f"### {name}", "", caption, "", f"![{name}]({name})", ""]
  storage.write_text(out / f"{file_prefix}report.md", "\n".join(sections))
  record = {"raw": summary}
  if temperature is not None:
    record["temperature"] = temperature
  storage.write_text(out / f"{file_prefix}report.json", json.dumps(record, indent=2) + "\n")
  logging.info("calibration report written to %s", out / f"{file_prefix}report.md")
  return summary


def write_training_report(workdir, config, logits, labels, train_counts, summary=None,
                          validation=None) -> Optional[dict]:
  """End-of-training report, with temperature scaling when configured.

  Never fails the run for a missing plotting library: without Matplotlib or
  SciPy it logs a warning and returns None.

  Args:
    workdir: the run's workdir.
    config: the run's config.
    logits, labels: final test logits and labels.
    train_counts: int [C].
    summary: the metrics of these logits if already computed (the
      evaluator's), else computed here.
    validation: optional (logits, labels) of a held-out split (never the test
      set) on which the temperature is fitted.

  Returns:
    The summary dict of the raw logits, or None if skipped.
  """
  from lt_calib.data import offline, sources  # pylint: disable=g-import-not-at-top
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
    import scipy  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    logging.warning("calibration report skipped (%s): pip install -e '.[analysis]'.", e)
    return None
  temperature = None
  if validation is not None:
    temperature = temperature_section(validation[0], validation[1], logits, labels,
                                      train_counts, config.calibration_bins)
  title = (f"{config.dataset.name} rho={config.dataset.imbalance_ratio:g} "
           f"{config.mix.name}+{config.loss.name}")
  return write_report(workdir, logits, labels, train_counts, config.calibration_bins,
                      title, temperature=temperature,
                      class_names=offline.load_class_names(sources.get_info(config.dataset.name),
                                                           config.dataset),
                      summary=summary)
