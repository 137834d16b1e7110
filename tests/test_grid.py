"""Grid runner: table arithmetic, resumability, and the :smoke grid end to end."""

import csv
import io
import json
import pathlib

import numpy as np
import pytest

from configs.grids import table4
from lt_calib import config_checks, grid, reporting


def fake_final(top1, few=None):
  return {"top1": top1, "many_acc": top1 + 0.1, "medium_acc": top1 - 0.1,
          "few_acc": few, "ece": 0.2, "nll": 1.5}


def small_grid(**fields):
  config = table4.get_config("smoke")
  config.mixes, config.losses, config.seeds = ("none", "remix"), ("ce", "bayias"), (0, 1)
  for key, value in fields.items():
    config[key] = value
  return config


def test_aggregate_means_stds_and_deltas():
  finals = {("none", "ce"): [fake_final(0.70), fake_final(0.72)],
            ("remix", "ce"): [fake_final(0.75), fake_final(0.79)],
            ("none", "bayias"): [fake_final(0.78)],
            ("remix", "bayias"): [fake_final(0.80, few=0.3), fake_final(0.84, few=None)]}
  rows = {(r["mix"], r["loss"]): r for r in grid.aggregate(small_grid(), finals)}
  assert list(rows) == [("none", "ce"), ("remix", "ce"), ("none", "bayias"),
                        ("remix", "bayias")]  # Grouped by loss, as Table 4.
  r = rows[("remix", "ce")]
  assert r["seeds"] == 2
  assert r["top1_mean"] == pytest.approx(77.0)
  assert r["top1_std"] == pytest.approx(np.sqrt(2 * 2.0 ** 2))  # ddof 1: sqrt(8/1).
  assert r["many_acc_mean"] == pytest.approx(87.0)
  assert r["delta_same_loss"] == pytest.approx(77.0 - 71.0)
  assert r["delta_baseline"] == pytest.approx(77.0 - 71.0)
  b = rows[("remix", "bayias")]
  assert b["delta_same_loss"] == pytest.approx(82.0 - 78.0)
  assert b["delta_baseline"] == pytest.approx(82.0 - 71.0)
  assert b["few_acc_mean"] == pytest.approx(30.0) and b["few_acc_std"] is None
  n = rows[("none", "bayias")]
  assert n["top1_std"] is None and n["delta_same_loss"] is None  # One seed; own reference.
  assert rows[("none", "ce")]["delta_baseline"] is None
  assert rows[("none", "ce")]["few_acc_mean"] is None

  markdown = grid.table_markdown(small_grid(), grid.aggregate(small_grid(), finals))
  assert "| remix | ce | 77.00 ± 2.83 | +6.00 | +6.00 | 87.00 ± 2.83 |" in markdown
  assert "| none | bayias | 78.00 | - | +7.00 |" in markdown
  table = list(csv.DictReader(io.StringIO(grid.table_csv(list(rows.values())))))
  assert table[1]["top1_mean"] == "77" and table[0]["few_acc_mean"] == ""


def fake_train(calls):
  """Stands in for train.train_and_evaluate: writes what a finished run writes."""
  def train_fn(config, workdir):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    calls.append(workdir.name)
    saved = json.loads(config.to_json_best_effort())
    (workdir / "config.json").write_text(json.dumps(saved))
    reporting.write_json(workdir / "summary.json", {
        "config": saved, "num_train_images": 12406,
        "steps": config.num_epochs * (12406 // config.batch_size),
        "final": fake_final(0.5 + 0.01 * config.seed)})
  return train_fn


def test_finished_cells_are_skipped_and_changed_configs_refused(tmp_path):
  calls = []
  config = small_grid()
  grid.run_grid(config, tmp_path, fake_train(calls))
  assert sorted(calls) == sorted(c.name for c in grid.grid_cells(config)) and len(calls) == 8
  assert (tmp_path / "table.md").exists() and (tmp_path / "table.csv").exists()
  # A cell killed before it finished (config.json, no summary) runs again.
  (tmp_path / "remix__bayias__seed1" / "summary.json").unlink()
  calls.clear()
  rows = grid.run_grid(config, tmp_path, fake_train(calls))
  assert calls == ["remix__bayias__seed1"]
  assert rows[-1]["top1_mean"] == pytest.approx(50.5)
  # Bookkeeping fields may change; anything else is another experiment.
  calls.clear()
  config.base.log_every_steps = 1
  grid.run_grid(config, tmp_path, fake_train(calls))
  assert not calls
  config.base.optim.learning_rate = 0.05
  with pytest.raises(ValueError, match=r"fields \['optim.learning_rate'\] differ"):
    grid.run_grid(config, tmp_path, fake_train(calls))


def test_cells_apply_presets_and_every_variant_is_valid():
  for arg in ("", "smoke", "cpu", "cpu,dataset=cifar100,rho=50"):
    config = table4.get_config(arg)
    for cell in grid.grid_cells(config):
      config_checks.check_config(grid.cell_config(config, cell))
  config = table4.get_config("cpu,rho=50")
  assert config.base.dataset.imbalance_ratio == 50
  assert (len(config.mixes), len(config.losses), len(config.seeds)) == (2, 2, 2)
  full = table4.get_config()
  ldam = grid.cell_config(full, grid.Cell("remix", "ldam_drw", 2))
  assert (ldam.mix.name, ldam.loss.name, ldam.loss.schedule, ldam.model.head, ldam.seed,
          ldam.loss.drw_epoch) == ("remix", "ldam", "drw", "normalized", 2, 160)
  assert full.base.loss.schedule == "none"  # The base is left as it was.
  with pytest.raises(ValueError, match="unknown names"):
    grid.grid_cells(small_grid(losses=("ce", "hinge")))
  with pytest.raises(ValueError, match="not understood"):
    table4.get_config("fast")


def test_smoke_grid_end_to_end(tmp_path, cifar10_file):
  # Two of the :smoke grid's cells (the normalised head, DRW, a mixing method
  # and both deltas) keep this test short; the CLI runs all twelve.
  config = table4.get_config("smoke")
  config.mixes, config.losses, config.baseline = ("none", "remix"), ("ldam_drw",), (
      "none", "ldam_drw")
  rows = grid.run_grid(config, tmp_path)
  assert [(r["mix"], r["seeds"]) for r in rows] == [("none", 1), ("remix", 1)]
  for row in rows:
    for key in ("top1", "many_acc", "medium_acc", "ece", "nll"):
      assert np.isfinite(row[f"{key}_mean"]), (row["mix"], key)
    assert row["few_acc_mean"] is None  # rho = 100 leaves no class under 20 images.
  assert rows[1]["delta_same_loss"] == pytest.approx(rows[1]["top1_mean"] - rows[0]["top1_mean"])
  markdown = (tmp_path / "table.md").read_text()
  assert markdown.count("\n| ") == 3 and "| remix | ldam_drw |" in markdown
  summary = json.loads((tmp_path / "remix__ldam_drw__seed0" / "summary.json").read_text())
  assert summary["config"]["model"]["head"] == "normalized"
  assert summary["steps"] == 12406 // 1024

  def must_not_train(config, workdir):
    raise AssertionError(f"{workdir} was finished and should be skipped")
  assert grid.run_grid(config, tmp_path, must_not_train) == rows
