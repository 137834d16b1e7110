"""Tests of the validation split, the label-shift table and `python -m lt_calib.evaluate`."""

import csv
import json
import os
import subprocess
import sys
import warnings

import ml_collections
import numpy as np
import pytest

from lt_calib import evaluate
from lt_calib.calibration import posthoc, report
from lt_calib.data import long_tail, sources
from lt_calib.errors import ConfigError
from tests.conftest import REPO
from tests.helpers import tiny_config


def test_validation_indices_avoid_training_set_and_record_shortfall():
  labels = np.repeat(np.arange(3), [10, 30, 30])
  kept = np.concatenate([np.arange(10), np.arange(10, 20), np.arange(40, 45)])
  idx = sources.validation_indices(labels, kept, per_class=12, seed=0)
  assert not set(idx) & set(kept)
  # Class 0 has no unused image, class 1 has 20 (12 taken), class 2 has 25.
  assert np.bincount(labels[idx], minlength=3).tolist() == [0, 12, 12]
  np.testing.assert_array_equal(idx, sources.validation_indices(labels, kept, 12, 0))
  assert not np.array_equal(idx, sources.validation_indices(labels, kept, 12, 1))
  few = sources.validation_indices(labels, kept, per_class=22, seed=0)
  assert np.bincount(labels[few], minlength=3).tolist() == [0, 20, 22]


def test_cifar10_validation_split_leaves_the_lt_training_set_unchanged(cifar10_file):
  cfg = tiny_config(dataset__n_max=0).dataset
  with np.load(cifar10_file, allow_pickle=False) as archive:
    pool = archive["train_labels"]
  info = sources.get_info("cifar10")
  kept = sources.train_indices(info, pool, cfg)
  # Same rule as before: CIFAR-10-LT-100 keeps 12,406 images.
  assert len(kept) == 12406
  idx = sources.validation_indices(pool, kept, per_class=50, seed=0)
  assert not set(idx) & set(kept)
  # Class 0 keeps all of its 5,000 images, so none is left for validation.
  assert np.bincount(pool[idx], minlength=10).tolist() == [0] + [50] * 9
  images, labels = sources.load_validation_split(cfg, 50)
  assert images.shape == (450, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, pool[idx])


def test_label_shift_rows_and_table():
  rng = np.random.RandomState(0)
  counts = long_tail.long_tail_counts(500, 10, 100.0)
  labels = np.repeat(np.arange(10), 100)
  logits = rng.randn(1000, 10) + np.log(counts / counts.sum())
  logits[np.arange(1000), labels] += 1.5
  config = ml_collections.ConfigDict(
      {"loss": {"name": "ce", "test_prior": "uniform"}, "calibration_bins": 15})
  data = sources.Dataset(None, None, None, labels, sources.get_info("cifar10"),
                          long_tail.class_prior(np.repeat(np.arange(10), counts), 10),
                          "fake")
  run = evaluate.Run(config, data, 0, None, logits)
  bayias_config = ml_collections.ConfigDict(config.to_dict())
  bayias_config.loss.name = "bayias"
  balanced = logits - np.log(counts / counts.sum())  # As if trained with Bayias.
  other = evaluate.Run(bayias_config, data, 0, None, balanced)
  rows = evaluate.label_shift_rows(run, [100, 1, 0.01], bayias_logits={0.01: logits},
                                   others=[other])
  methods = ["ce raw", "ce prior-corrected", "bayias raw", "bayias prior-corrected"]
  assert [(r["method"], r["test_rho"]) for r in rows] == (
      [(m, 100) for m in methods] + [(m, 1) for m in methods]
      + [(m, 0.01) for m in methods] + [("Bayias trained for pi'", 0.01)])
  assert [r["num_images"] for r in rows[::4][:2]] == [
      sum(posthoc.shifted_counts(100, 10, 100)), 1000]
  by = {(r["method"], r["test_rho"]): r["top1"] for r in rows}
  # CE logits carry the train prior: correcting to the reversed test prior helps.
  assert by[("ce prior-corrected", 0.01)] > by[("ce raw", 0.01)]
  # Both references lead to the same corrected logits here.
  for rho in (100, 1, 0.01):
    assert by[("bayias prior-corrected", rho)] == by[("ce prior-corrected", rho)]
  assert by[("bayias raw", 1)] == by[("bayias prior-corrected", 1)]
  text = evaluate.label_shift_markdown(rows)
  assert "rho'=100 (n=" in text and "| ce prior-corrected |" in text
  assert text.count("| Bayias trained for pi' |") == 3  # One line a table.


def read_csv(path) -> list:
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_evaluate_cli_writes_every_picture_and_table(tiny_run, tmp_path):
  # One command for every output: the pictures, temperature scaling, the
  # label-shift table and issue 19's estimated test priors.
  workdir, summary = tiny_run
  out = tmp_path / "eval"
  result = subprocess.run(
      [sys.executable, "-m", "lt_calib.evaluate", f"--workdir={workdir}",
       "--test_rho=100,1,0.1,0.01", "--test_prior=oracle,uniform,em", "--val_per_class=10",
       "--test_subset=200", f"--out={out}"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in list(report.PICTURES) + ["reliability_temperature.png", "report.md",
                                       "label_shift.md", "label_shift.csv",
                                       "prior_estimation.png", "prior_estimation.csv",
                                       "prior_estimation.md"]:
    assert (out / name).stat().st_size > 0, name
  text = (out / "report.md").read_text()
  assert all(f"]({name})" in text for name in report.PICTURES)
  assert "temperature-scaled" in text and "Test label shift" in text
  assert "Estimated test priors" in text
  rhos = (100.0, 1.0, 0.1, 0.01)
  # 20 test images a class; int(20 * rho'^(-c/9)) (reversed for rho' < 1):
  # 20+11+7+4+2+1 = 45 at 100 and 0.01, 20+15+11+9+7+5+4+3+2+2 = 78 at 0.1.
  sizes = {100.0: 45, 1.0: 200, 0.1: 78, 0.01: 45}
  rows = read_csv(out / "label_shift.csv")
  assert {(r["method"], float(r["test_rho"]), int(r["num_images"])) for r in rows} == {
      (method, rho, sizes[rho]) for method in ("bayias raw", "bayias prior-corrected")
      for rho in rhos}
  rows = read_csv(out / "prior_estimation.csv")
  assert [(r["prior"], float(r["test_rho"])) for r in rows] == [
      (p, rho) for rho in rhos for p in ("oracle", "uniform", "em")]
  for row in rows:
    for key in ("top1", "mean_class_acc", "ece", "nll", "l1", "kl"):
      assert np.isfinite(float(row[key])), (row["prior"], key)
  assert all(float(r["l1"]) == 0.0 for r in rows if r["prior"] == "oracle")
  # Top-1, ECE, NLL and L1 tables, one em line each.
  assert (out / "prior_estimation.md").read_text().count("| em |") == 4
  result = json.loads((out / "evaluation.json").read_text())
  # The restored checkpoint gives the training run's own final numbers.
  assert result["summary"]["top1"] == pytest.approx(summary["final"]["top1"])
  assert result["summary"]["nll"] == pytest.approx(summary["final"]["nll"], rel=1e-4)
  # At n_max 625 every class keeps pool images out of training, class 0 too
  # (the standard split leaves it none: test_cifar10_validation_split_...).
  assert result["temperature"]["val_count_per_class"] == [10] * 10


def test_priors_needing_a_held_out_split_are_refused_before_any_work(tmp_path):
  # No run in the folder: the refusal comes before anything is read.
  with pytest.raises(ConfigError, match=r"^--test_prior=bbse needs a labelled held-out"):
    evaluate.evaluate_workdir(tmp_path / "no_run", test_priors=["bbse"], val_per_class=0)


@pytest.mark.slow
def test_training_report_call(tiny_run, tmp_path):
  """The call the end of training makes, with temperature scaling configured."""
  workdir, _ = tiny_run
  run = evaluate.load_run(workdir, test_subset=200)
  summary = report.write_training_report(
      tmp_path, run.config, run.test_logits, run.dataset.test_labels,
      run.dataset.prior.counts, validation=evaluate.validation_logits(run, 5))
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["raw"] == summary
  assert saved["temperature"]["val_count_per_class"] == [5] * 10
  assert (tmp_path / "reliability_temperature.png").exists()
  with pytest.raises(FileNotFoundError, match="checkpoint 7"):
    evaluate.load_run(workdir, checkpoint=7, test_subset=200)


@pytest.mark.slow
def test_single_shifted_test_prior_from_an_earlier_checkpoint(tiny_run, tmp_path):
  workdir, _ = tiny_run  # 12 steps an epoch: checkpoints 12 and 24.
  result = evaluate.evaluate_workdir(workdir, checkpoint=12, test_rhos=[0.1],
                                     val_per_class=0, out=tmp_path, test_subset=200)
  assert result["checkpoint_step"] == 12
  # 20 test images a class in a 200-image subset, reversed profile.
  assert result["num_test_images"] == sum(posthoc.shifted_counts(20, 10, 0.1))
  assert "prior_corrected" in result and "label_shift" not in result
  assert "| metric | raw | prior-corrected |" in (tmp_path / "report.md").read_text()
  assert not (tmp_path / "label_shift.md").exists()


def test_shifted_log_prior_gives_absent_classes_minus_infinity_without_a_warning():
  labels = np.array([0, 0, 1, 1, 2, 2])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # numpy's divide-by-zero warning would fail here.
    log_prior = evaluate.shifted_log_prior(labels, np.array([0, 1, 2]), 3)
  np.testing.assert_allclose(np.exp(log_prior), [2 / 3, 1 / 3, 0])
  assert log_prior[2] == -np.inf
