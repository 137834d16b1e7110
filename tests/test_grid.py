"""Grid runner: table arithmetic, resumability, and the :smoke grid end to end."""

import csv
import fcntl
import io
import json
import pathlib

import numpy as np
import pytest

from configs.grids import fidelity, table4
from lt_calib import config_checks, errors, reporting, run_identity
from lt_calib.experiments import grid, presets, tables


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
  rows = {(r["mix"], r["loss"]): r for r in tables.aggregate(small_grid(), finals)}
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

  markdown = tables.table_markdown(small_grid(), tables.aggregate(small_grid(), finals))
  assert "| remix | ce | 77.00 ± 2.83 | +6.00 | +6.00 | 87.00 ± 2.83 |" in markdown
  assert "| none | bayias | 78.00 | - | +7.00 |" in markdown
  table = list(csv.DictReader(io.StringIO(tables.table_csv(list(rows.values())))))
  assert table[1]["top1_mean"] == "77" and table[0]["few_acc_mean"] == ""


def fake_train(calls):
  """Stands in for trainer.train_and_evaluate: writes what a finished run writes."""
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
  assert sorted(calls) == sorted(c.name for c in presets.grid_cells(config)) and len(calls) == 8
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
    for cell in presets.grid_cells(config):
      config_checks.check_config(presets.cell_config(config, cell))
  config = table4.get_config("cpu,rho=50")
  assert config.base.dataset.imbalance_ratio == 50
  assert (len(config.mixes), len(config.losses), len(config.seeds)) == (2, 2, 2)
  full = table4.get_config()
  ldam = presets.cell_config(full, presets.Cell("remix", "ldam_drw", 2))
  assert (ldam.mix.name, ldam.loss.name, ldam.loss.schedule, ldam.model.head, ldam.seed,
          ldam.loss.drw_epoch) == ("remix", "ldam", "drw", "normalized", 2, 160)
  assert full.base.loss.schedule == "none"  # The base is left as it was.
  with pytest.raises(ValueError, match="unknown names"):
    presets.grid_cells(small_grid(losses=("ce", "hinge")))
  with pytest.raises(ValueError, match="not understood"):
    table4.get_config("fast")


@pytest.mark.slow
def test_smoke_grid_end_to_end(tmp_path, cifar10_file, no_report):
  # Two of the :smoke grid's cells (the normalised head, DRW, a mixing method
  # and both deltas) keep this test short; the CLI runs all twelve.
  config = table4.get_config("smoke")
  config.mixes, config.losses, config.baseline = ("none", "remix"), ("ldam_drw",), (
      "none", "ldam_drw")
  # The tests' tiny split (n_max 625, 1,547 images): 12 steps of 128, as the
  # :smoke budget's 12 of 1,024 on the standard split.
  config.base.dataset.n_max, config.base.batch_size = 625, 128
  rows = grid.run_grid(config, tmp_path)
  assert [(r["mix"], r["seeds"]) for r in rows] == [("none", 1), ("remix", 1)]
  for row in rows:  # One seed: each mean is that cell's own final figure.
    cell = json.loads((tmp_path / f"{row['mix']}__ldam_drw__seed0" / "summary.json")
                      .read_text())["final"]
    for key, unit in (("top1", 100), ("many_acc", 100), ("medium_acc", 100),
                      ("few_acc", 100), ("ece", 100), ("nll", 1)):  # % and nats.
      assert row[f"{key}_mean"] == pytest.approx(unit * cell[key]), (row["mix"], key)
      assert row[f"{key}_std"] is None  # No spread from one seed.
  assert rows[1]["delta_same_loss"] == pytest.approx(rows[1]["top1_mean"] - rows[0]["top1_mean"])
  markdown = (tmp_path / "table.md").read_text()
  assert markdown.count("\n| ") == 3 and "| remix | ldam_drw |" in markdown
  summary = json.loads((tmp_path / "remix__ldam_drw__seed0" / "summary.json").read_text())
  assert summary["config"]["model"]["head"] == "normalized"
  assert summary["steps"] == 1547 // 128

  def must_not_train(config, workdir):
    raise AssertionError(f"{workdir} was finished and should be skipped")
  assert grid.run_grid(config, tmp_path, must_not_train) == rows


# ---------------------------------------------------------------------------
# The official recipe, the fidelity grids, grid presets and pairs.
# Expected values are transcribed from the official code (XuZhengzhuo/Prior-LT:
# config/cifar10_100.py, config/cifar100_100.py, core.py, utils.py) and the
# paper (Appendix C.1), not from this library's output.


def official_lr(epoch):
  """utils.adjust_learning_rate of the official code, for the 0-based epoch."""
  epoch += 1
  if epoch <= 5:
    return 0.1 * epoch / 5
  if epoch > 180:
    return 0.1 * 0.0001
  if epoch > 160:
    return 0.1 * 0.01
  return 0.1


def test_official_variant_is_the_code_recipe():
  from configs import cifar100_lt, cifar10_lt
  from lt_calib.train import state as state_lib
  from lt_calib.method import mixing
  config = cifar10_lt.get_config("official")
  config_checks.check_config(config)
  # cifar10_100.py: unimix_alp 0.8, unimix_tau -0.5 (member weight n^tau, so
  # partner class ∝ n^0.5), mix_stop_epoch 200 = epochs, batch_size 64.
  assert (config.mix.name, config.mix.pairing, config.mix.alpha) == ("unimix", "in_batch", 0.8)
  assert mixing.partner_exponent(config.mix) == pytest.approx(0.5)
  assert config.mix.stop_epoch >= config.num_epochs == 200
  assert (config.batch_size, config.loss.name, config.eval_every_epochs) == (64, "bayias", 1)
  assert (config.optim.learning_rate, config.optim.momentum, config.optim.weight_decay,
          config.optim.nesterov) == (0.1, 0.9, 2e-4, False)
  steps_per_epoch = 12406 // 64
  _, schedule = state_lib.make_optimizer(config, steps_per_epoch)
  for epoch in (0, 1, 2, 3, 4, 5, 100, 159, 160, 179, 180, 199):
    for step in (epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1):
      assert float(schedule(step)) == pytest.approx(official_lr(epoch), rel=1e-5), (epoch, step)
  # cifar100_100.py: unimix_tau -0.1 -> partner class ∝ n^0.9.
  assert mixing.partner_exponent(cifar100_lt.get_config("official").mix) == pytest.approx(0.9)
  # Budgets shrink the recipe, in either order; "never stops" stays never.
  for arg in ("official,quick", "quick,official"):
    quick = cifar10_lt.get_config(arg)
    assert (quick.num_epochs, quick.mix.stop_epoch, quick.batch_size) == (6, 6, 64)
    assert (tuple(quick.optim.decay_epochs), tuple(quick.optim.decay_factors),
            quick.optim.warmup_epochs) == ((4, 5), (0.01, 0.0001), 1)
  smoke = cifar10_lt.get_config("official,smoke")
  assert (smoke.num_epochs, smoke.mix.stop_epoch, smoke.mix.pairing) == (2, 2, "in_batch")
  # The paper-text default and the old variants are unchanged (App. C.1: 120).
  assert [cifar10_lt.get_config(a).mix.stop_epoch for a in ("", "smoke", "quick")] == [120, 1, 4]
  assert cifar10_lt.get_config("").batch_size == 128
  with pytest.raises(errors.ConfigError, match=r"allowed: \['official', 'quick', 'smoke', 'two_stage'\]"):
    cifar10_lt.get_config("official,fast")
  with pytest.raises(errors.ConfigError, match="both budgets"):
    cifar10_lt.get_config("smoke,quick")


def flat(config):
  return run_identity.flatten(json.loads(config.to_json_best_effort()))


def test_fidelity_decomposition_changes_one_factor_per_row():
  from lt_calib.method import mixing
  config = fidelity.get_config("decomposition")
  cells = {(c.mix, c.loss): presets.cell_config(config, c) for c in presets.grid_cells(config)
           if c.seed == 0}
  for cell_config in cells.values():
    config_checks.check_config(cell_config)
  # Bayias on every row, CE only at the two ends and without mixing.
  assert sorted(l for m, l in cells if l == "ce") == ["ce"] * 3
  assert {m for m, l in cells if l == "ce"} == {"none", "paper_text", "official"}
  assert len(cells) == 12 and tuple(config.seeds) == (0, 1, 2)
  # (pairing, alpha, partner class ∝ pi^e: e, mixing steps stop at epoch, batch).
  expected = {
      "paper_text": ("sampler", 0.5, -1.0, 120, 128),   # Eq. 9, App. C.1.
      "tau_counts": ("sampler", 0.5, 0.0, 120, 128),    # n^(1 - 1): uniform.
      "tau_official": ("sampler", 0.5, 0.5, 120, 128),  # n^(1 - 0.5).
      "stop_never": ("sampler", 0.5, -1.0, 200, 128),
      "alpha_08": ("sampler", 0.8, -1.0, 120, 128),
      "in_batch": ("in_batch", 0.5, -1.0, 120, 128),
      "batch_64": ("sampler", 0.5, -1.0, 120, 64),
      "official": ("in_batch", 0.8, 0.5, 200, 64),
  }
  for row, values in expected.items():
    c = cells[(row, "bayias")]
    assert c.mix.name == "unimix" and c.loss.name == "bayias", row
    assert (c.mix.pairing, mixing.resolve_alpha(c.mix), mixing.partner_exponent(c.mix),
            c.mix.stop_epoch, c.batch_size) == pytest.approx(values), row
  assert cells[("none", "bayias")].mix.name == "none"
  # One factor at a time: the fields each row changes from paper_text.
  paper = flat(cells[("paper_text", "bayias")])
  changed = {row: {k for k, v in flat(cells[(row, "bayias")]).items() if paper[k] != v}
             for row in expected}
  assert changed["tau_counts"] == {"mix.tau_units"}
  assert changed["tau_official"] == {"mix.tau", "mix.tau_units"}
  assert changed["stop_never"] == {"mix.stop_epoch"}
  assert changed["alpha_08"] == {"mix.alpha"}
  assert changed["in_batch"] == {"mix.pairing"}
  assert changed["batch_64"] == {"batch_size"}
  assert changed["official"] == {"mix.tau", "mix.tau_units", "mix.stop_epoch", "mix.alpha",
                                 "mix.pairing", "batch_size", "optim.warmup_epochs",
                                 "optim.decay_epochs", "optim.decay_factors"}
  assert flat(cells[("official", "ce")])["loss.name"] == "ce"
  assert config.base.eval_every_epochs == 1 and tuple(config.baseline) == ("paper_text",
                                                                            "bayias")


def test_fidelity_cpu_budget_and_other_parts():
  config = fidelity.get_config("decomposition,cpu")
  base = config.base
  # table4.py:cpu's protocol: ResNet-8 width 16, 10 epochs of 128, 120/200 -> 6.
  assert (base.model.depth, base.model.width, base.num_epochs, base.batch_size) == (8, 16, 10,
                                                                                     128)
  assert (base.optim.warmup_epochs, tuple(base.optim.decay_epochs)) == (1, (8, 9))
  assert base.dataset.test_subset == 0 and tuple(config.seeds) == (0, 1, 2)
  stops = {c.mix: presets.cell_config(config, c).mix.stop_epoch
           for c in presets.grid_cells(config) if c.loss == "bayias" and c.mix != "none"}
  assert stops["paper_text"] == 6 and stops["stop_never"] == stops["official"] == 10
  official = presets.cell_config(config, presets.Cell("official", "bayias", 0))
  assert (official.optim.warmup_epochs, tuple(official.optim.decay_epochs),
          official.batch_size) == (1, (8, 9), 64)  # The budget's schedule, the code's batch.
  data = fidelity.get_config("data_effect")
  cell = presets.cell_config(data, presets.grid_cells(data)[0])
  assert (cell.dataset.imbalance_ratio, cell.model.depth, cell.mix.name, cell.loss.name,
          cell.num_epochs) == (1.0, 32, "none", "ce", 164)
  # He et al. 2016: 64k iterations of 128 (390 an epoch), lr / 10 at 32k and 48k.
  assert cell.num_epochs * 390 == 63960 and cell.optim.weight_decay == 1e-4
  assert [round(e * 390) for e in cell.optim.decay_epochs] == [32000, 48000]
  rho = fidelity.get_config("rho_rows,cpu,rho=50,seeds=2")
  assert [(c.mix, c.loss, c.seed) for c in presets.grid_cells(rho)] == [
      ("none", "ce", 0), ("none", "ce", 1), ("official", "bayias", 0),
      ("official", "bayias", 1)]
  assert presets.cell_config(rho, presets.Cell("none", "ce", 0)).dataset.imbalance_ratio == 50
  other = fidelity.get_config("rho_rows,recipe=in_batch,smoke")
  assert presets.grid_pairs(other) == [("none", "ce"), ("in_batch", "bayias")]
  assert fidelity.get_config("data_effect,report").train is False
  for arg in ("decomposition,fast", "cpu", "rho_rows,recipe=mixup"):
    with pytest.raises(errors.ConfigError):
      fidelity.get_config(arg)


def fake_train_with_history(calls):
  """Like fake_train, plus metrics.jsonl: best top-1 0.60 + 0.01 seed at epoch 1.

  The summary's own best_epoch_top1 is what a resumed run would know (the
  evaluations after the restart only), lower than the true best.
  """
  def train_fn(config, workdir):
    fake_train(calls)(config, workdir)
    workdir = pathlib.Path(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    summary["best_epoch_top1"] = {"top1": 0.5 + 0.01 * config.seed, "epoch": 2}
    reporting.write_json(workdir / "summary.json", summary)
    history = (0.3, 0.6 + 0.01 * config.seed, 0.5 + 0.01 * config.seed)
    (workdir / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": epoch, "top1": top1}) + "\n"
        for epoch, top1 in enumerate(history)))
  return train_fn


def preset_grid():
  config = small_grid()
  config.mixes = ("none", "tau_counts", "remix")
  config.mix_presets = {"tau_counts": (("mix.name", "unimix"), ("mix.tau_units", "counts"))}
  config.pairs = (("none", "ce"), ("none", "bayias"), ("tau_counts", "bayias"))
  return config


def test_grid_presets_pairs_and_csv(tmp_path):
  config = preset_grid()
  cell = presets.cell_config(config, presets.Cell("tau_counts", "bayias", 1))
  assert (cell.mix.name, cell.mix.tau_units, cell.loss.name, cell.seed) == (
      "unimix", "counts", "bayias", 1)
  calls = []
  rows = grid.run_grid(config, tmp_path, fake_train_with_history(calls))
  # Only the listed pairs train, each with both seeds; remix is in no pair.
  assert sorted(calls) == sorted(f"{m}__{l}__seed{s}" for m, l in config.pairs
                                 for s in (0, 1))
  table = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
  assert [(r["mix"], r["loss"], r["seeds"]) for r in table] == [
      ("none", "ce", "2"), ("none", "bayias", "2"), ("tau_counts", "bayias", "2")]
  # Final top-1 0.50 / 0.51; best epoch (test-set selection) 0.60 / 0.61.
  for row in table:
    assert float(row["top1_mean"]) == pytest.approx(50.5)
    assert float(row["top1_std"]) == pytest.approx(np.sqrt(0.5))  # ddof 1.
    assert float(row["best_top1_mean"]) == pytest.approx(60.5)
    assert float(row["best_top1_std"]) == pytest.approx(np.sqrt(0.5))
  assert rows[2]["delta_same_loss"] == pytest.approx(0.0)
  markdown = (tmp_path / "table.md").read_text()
  assert "Best-epoch top-1 (%, test-set selection)" in markdown
  assert markdown.count("\n| ") == 4 and "| remix |" not in markdown


def test_grid_preset_and_pair_errors():
  config = preset_grid()
  config.mix_presets = {"tau_counts": (("mix.tau_unit", "counts"),)}
  with pytest.raises(errors.ConfigError, match="'mix.tau_unit', which grid.base"):
    presets.grid_cells(config)
  config.mix_presets = {"unimix": (("mix.alpha", 0.8),)}
  config.mixes = ("none", "unimix")
  config.pairs = (("none", "ce"),)
  with pytest.raises(errors.ConfigError, match="shadows the built-in"):
    presets.grid_cells(config)
  config = preset_grid()
  config.pairs = (("none", "ce"), ("tau_counts", "ldam"))
  with pytest.raises(errors.ConfigError, match=r"grid.pairs has \[\('tau_counts', 'ldam'\)\]"):
    presets.grid_cells(config)


def test_locked_cells_are_left_to_their_process_and_report_trains_nothing(tmp_path):
  config = preset_grid()
  busy = tmp_path / "none__bayias__seed1"
  busy.mkdir(parents=True)
  calls = []
  with open(busy / ".lock", "a") as handle:
    # Another process training that cell holds this lock.
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    rows = grid.run_grid(config, tmp_path, fake_train(calls))
  assert "none__bayias__seed1" not in calls and len(calls) == 5
  assert [r["seeds"] for r in rows] == [2, 1, 2]
  assert json.loads((tmp_path / "grid.json").read_text())["missing_cells"] == [
      "none__bayias__seed1"]
  # A report pass writes the tables of what is finished and trains nothing.
  config.train = False
  calls.clear()
  assert [r["seeds"] for r in grid.run_grid(config, tmp_path, fake_train(calls))] == [2, 1, 2]
  assert not calls
  # The lock is gone with its holder: the next training run takes the cell.
  config.train = True
  assert [r["seeds"] for r in grid.run_grid(config, tmp_path, fake_train(calls))] == [2, 2, 2]
  assert calls == ["none__bayias__seed1"]


def test_a_cell_stopped_by_sigterm_stops_the_grid(tmp_path):
  calls = []

  def stopped_on_second_cell(config, workdir):
    if len(calls) == 1:  # As train_and_evaluate returns after SIGTERM.
      calls.append(pathlib.Path(workdir).name)
      return {"stopped_at_step": 7, "reason": "preempted"}
    return fake_train(calls)(config, workdir)

  rows = grid.run_grid(preset_grid(), tmp_path, stopped_on_second_cell)
  assert calls == ["none__ce__seed0", "none__ce__seed1"]
  assert [r["seeds"] for r in rows] == [1, 0, 0]
  assert (tmp_path / "table.csv").exists()
  assert len(json.loads((tmp_path / "grid.json").read_text())["missing_cells"]) == 5
