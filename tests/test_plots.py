"""Tests of lt_calib.calibration.plots and .report: every picture for 10-1000 classes."""

import json

import numpy as np
import pytest
import sklearn.metrics

from lt_calib.calibration import metrics, plots, report
from lt_calib.calibration import summary as summary_lib
from lt_calib.data import long_tail

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_predictions(num_classes, n=2000, seed=0):
  """Head-biased, over-confident logits with labels, and LT train counts."""
  rng = np.random.RandomState(seed)
  counts = long_tail.long_tail_counts(500, num_classes, 100.0)
  labels = rng.randint(0, num_classes, n)
  logits = rng.randn(n, num_classes) + np.log(counts / counts.sum())
  logits[np.arange(n), labels] += 2.0
  return 2.0 * logits, labels, counts


def assert_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 5000, path


@pytest.mark.parametrize("num_classes", [10, 100, 1000])
def test_every_picture_is_written(tmp_path, num_classes):
  logits, labels, counts = fake_predictions(num_classes)
  probs = metrics.softmax(logits)
  pred, conf = probs.argmax(1), probs.max(1)
  ece = plots.reliability_diagram(conf, pred == labels, tmp_path / "rel.png")
  assert ece == pytest.approx(metrics.expected_calibration_error(probs, labels))
  plots.confidence_accuracy_density(conf, pred == labels, tmp_path / "joint.png")
  matrix = plots.confusion_matrix(pred, labels, num_classes)
  names = [f"class{c}" for c in range(num_classes)] if num_classes == 10 else None
  plots.confusion_plot(matrix, tmp_path / "conf.png", class_names=names)
  plots.confusion_plot(matrix, tmp_path / "logconf.png", log=True)
  per_class = metrics.per_class_accuracy(pred, labels, num_classes)
  plots.per_class_accuracy_plot(per_class, counts, tmp_path / "pc.png")
  for name in ("rel", "joint", "conf", "logconf", "pc"):
    assert_png(tmp_path / f"{name}.png")


def test_confusion_matrix_matches_sklearn():
  rng = np.random.RandomState(0)
  labels, pred = rng.randint(0, 7, 300), rng.randint(0, 7, 300)
  np.testing.assert_array_equal(plots.confusion_matrix(pred, labels, 7),
                                sklearn.metrics.confusion_matrix(labels, pred, labels=range(7)))


def test_batch_points_are_batch_means():
  conf = np.linspace(0.1, 0.9, 1000)
  correct = np.arange(1000) % 2 == 0
  cfd, acc = plots.batch_confidence_accuracy(conf, correct, batch_size=100, min_points=25)
  assert len(cfd) == 30  # 10 batches a pass, 3 passes for >= 25 points.
  assert np.mean(cfd) == pytest.approx(conf.mean())
  assert np.mean(acc) == pytest.approx(0.5)
  cfd2, _ = plots.batch_confidence_accuracy(conf, correct, batch_size=100, min_points=25)
  np.testing.assert_array_equal(cfd, cfd2)  # Fixed seed.


def test_degenerate_inputs_still_plot(tmp_path):
  """One class predicted with certainty: KDE is singular, bins mostly empty."""
  conf, correct = np.ones(300), np.ones(300, bool)
  plots.confidence_accuracy_density(conf, correct, tmp_path / "joint.png")
  plots.reliability_diagram(conf, correct, tmp_path / "rel.png")
  per_class = np.array([1.0, np.nan, np.nan])
  plots.per_class_accuracy_plot(per_class, [100, 10, 1], tmp_path / "pc.png")
  for name in ("joint", "rel", "pc"):
    assert_png(tmp_path / f"{name}.png")


def test_write_report_files_and_table(tmp_path):
  logits, labels, counts = fake_predictions(10, n=500)
  val_logits, val_labels, _ = fake_predictions(10, n=500, seed=1)
  temperature = report.temperature_section(val_logits, val_labels, logits, labels, counts)
  assert temperature["temperature"] > 1  # The fake logits are over-confident.
  assert temperature["val_nll_after"] < temperature["val_nll_before"]
  summary = report.write_report(tmp_path, logits, labels, counts, title="fake",
                                extra_tables=[("Extra", "| a |\n| --- |\n| 1 |")],
                                temperature=temperature)
  assert summary == summary_lib.summarize(logits, labels, counts)
  text = (tmp_path / "report.md").read_text()
  for name in list(report.PICTURES) + ["reliability_temperature.png"]:
    assert_png(tmp_path / name)
    assert f"]({name})" in text
  assert f"| top1 (%) | {100 * summary['top1']:.2f} | {100 * summary['top1']:.2f} |" in text
  assert "## Extra" in text
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["temperature"]["temperature"] == temperature["temperature"]
