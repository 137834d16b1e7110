"""The second stage (MiSLAS's classifier re-training, Table D3): LAS, schedule, freezing.

LAS values are checked against hand computations of MiSLAS's formula; the
freezing against the first stage's checkpoint, leaf by leaf and bit by bit.
Runs train the separable synthetic set (tests/helpers.py).
"""

import json

import jax
import numpy as np
import pytest

from configs import cifar10_lt, cifar100_lt, common
from lt_calib import checkpointing, config_checks, run_identity
from lt_calib import data as data_lib
from lt_calib.data import long_tail
from lt_calib.errors import ConfigError, WorkdirError
from lt_calib.method import losses
from lt_calib.train import state as state_lib
from lt_calib.train import trainer, two_stage
from tests.helpers import override, synthetic_config, synthetic_dataset

# CIFAR-10-LT, rho = 100: n_1 = 5000 ... n_K = 50.
CIFAR10_LT_COUNTS = np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])


def test_las_smoothing_equals_mislas_formula_by_hand():
  # Concave, head 0.3, tail 0 (MiSLAS's CIFAR-10 stage 2): e = 0.3 sin(pi u / 2),
  # u = (n - 50) / 4950. By hand: n = 2997: u = 0.595354, sin(0.935184) = 0.804705;
  # n = 1077: u = 0.207475, sin(0.325902) = 0.320162.
  concave = losses.las_smoothing(CIFAR10_LT_COUNTS, 0.3, 0.0, "concave")
  np.testing.assert_allclose(concave[[0, 1, 3, 9]], [0.3, 0.241412, 0.096049, 0.0],
                             atol=2e-6)
  assert np.all(np.diff(concave) < 0)  # More images, more smoothing.
  # Linear, head 0.4, tail 0.1: 0.1 + 0.3 u. Convex: 0.4 + 0.3 sin(3 pi / 2 + pi u / 2).
  linear = losses.las_smoothing(CIFAR10_LT_COUNTS, 0.4, 0.1, "linear")
  np.testing.assert_allclose(linear[[0, 1, 3, 9]], [0.4, 0.278606, 0.162242, 0.1],
                             atol=2e-6)
  convex = losses.las_smoothing(CIFAR10_LT_COUNTS, 0.4, 0.1, "convex")
  np.testing.assert_allclose(convex[[0, 1, 3, 9]], [0.4, 0.221898, 0.115791, 0.1],
                             atol=2e-6)
  with pytest.raises(ConfigError, match="las_shape"):
    losses.las_smoothing(CIFAR10_LT_COUNTS, 0.3, 0.0, "square")


def test_las_loss_is_smoothed_cross_entropy():
  rng = np.random.RandomState(0)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 3
  labels = np.array([0, 1, 3, 9, 9, 5])
  prior = long_tail.class_prior(np.repeat(np.arange(10), CIFAR10_LT_COUNTS), 10)
  cfg = cifar10_lt.get_config().loss
  cfg.name = "las"
  loss = losses.make_loss(cfg, prior)(logits, labels, 0)
  # Float64 reference: (1 - e_y) (-log p_y) + e_y mean_c (-log p_c).
  z = logits.astype(np.float64)
  log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
  e = 0.3 * np.sin(np.pi * (CIFAR10_LT_COUNTS[labels] - 50) / (2 * 4950))
  expected = (1 - e) * -log_p[np.arange(6), labels] + e * -log_p.mean(1)
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)


def test_two_stage_variant_is_mislas_stage_two():
  config = cifar10_lt.get_config("two_stage")
  assert (config.stage2.enabled, config.num_epochs, config.batch_size) == (True, 10, 128)
  assert (config.loss.name, config.mix.name, config.sampler.name) == (
      "las", "none", "class_balanced")
  assert (config.loss.las_head, config.loss.las_tail, config.stage2.batchnorm) == (
      0.3, 0.0, "frozen")
  assert config.optim.learning_rate == 0.05 and config.optim.weight_decay == 2e-4
  hundred = cifar100_lt.get_config("two_stage")
  assert (hundred.loss.las_head, hundred.loss.las_tail, hundred.stage2.batchnorm,
          hundred.optim.learning_rate) == (0.4, 0.1, "shift", 0.02)
  # A budget keeps its model: ':smoke,two_stage' follows a ':smoke' first stage.
  smoke = cifar10_lt.get_config("smoke,two_stage")
  assert (smoke.model.depth, smoke.num_epochs) == (8, 2)


def test_cosine_schedule_is_per_epoch():
  config = cifar10_lt.get_config("two_stage")
  schedule = state_lib.learning_rate_schedule(config, steps_per_epoch=7)
  rates = [float(schedule(step)) for step in (0, 6, 7, 35, 69)]
  # Epoch e: 0.05 (1 + cos(pi e / 10)) / 2; e = 0, 0, 1, 5, 9.
  np.testing.assert_allclose(rates, [0.05, 0.05, 0.0487764, 0.025, 0.00122358],
                             rtol=1e-5)


def first_stage_files(folder, config, fingerprint="ab" * 32, finished=True):
  """A first stage's config.json (+ summary.json when `finished`) without training."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(config.to_json_best_effort())
  if finished:
    (folder / "summary.json").write_text(json.dumps(
        {"final": {"top1": 0.5, "ece": 0.1}, "steps": 22, "fingerprint": fingerprint}))
  return folder


def test_first_stage_is_checked_before_training(tmp_path):
  config = cifar10_lt.get_config("smoke,two_stage")
  with pytest.raises(ConfigError, match="stage2.first_stage=DIR"):
    config_checks.check_config(config)
  first = first_stage_files(tmp_path / "first", cifar10_lt.get_config("smoke"),
                            finished=False)
  config.stage2.first_stage = str(first)
  with pytest.raises(WorkdirError, match="no finished run"):
    two_stage.first_stage_record(config)
  first_stage_files(first, cifar10_lt.get_config("smoke"))
  record = two_stage.first_stage_record(config)
  assert (record["step"], record["fingerprint"]) == (22, "ab" * 32)
  config.model.depth = 14
  with pytest.raises(ConfigError, match="model.depth: 8 -> 14"):
    two_stage.first_stage_record(config)
  assert two_stage.first_stage_record(cifar10_lt.get_config("smoke")) is None


def test_resume_after_another_first_stage_is_refused(tmp_path):
  config = cifar10_lt.get_config("smoke,two_stage")
  config.stage2.first_stage = str(first_stage_files(tmp_path / "first",
                                                    cifar10_lt.get_config("smoke")))
  record = two_stage.first_stage_record(config)
  run_identity.write(run_identity.open_workdir(tmp_path / "second"), config, {}, {}, 0,
                     first_stage=record)
  two_stage.check_unchanged(tmp_path / "second", record)  # The same: resumes.
  first_stage_files(tmp_path / "first", cifar10_lt.get_config("smoke"), fingerprint="cd" * 32)
  with pytest.raises(WorkdirError, match="another first stage"):
    two_stage.check_unchanged(tmp_path / "second", two_stage.first_stage_record(config))


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
  """A finished first stage on the synthetic set: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp("first")
  with pytest.MonkeyPatch.context() as patch:
    dataset = synthetic_dataset()
    patch.setattr(data_lib, "load", lambda cfg: dataset)
    summary = trainer.train_and_evaluate(synthetic_config(num_epochs=2), str(workdir))
  return workdir, summary


def second_stage_config(first_workdir, **overrides):
  """The first stage's config made a second stage (3 epochs of 11 steps of 32)."""
  config = common.apply_variant(synthetic_config(num_epochs=2), "two_stage")
  settings = dict(num_epochs=3, batch_size=32, eval_every_epochs=1, steps_per_dispatch=1,
                  stage2__first_stage=str(first_workdir))
  settings.update(overrides)
  return override(config, **settings)


def leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_second_stage_trains_the_classifier_alone_and_resumes(tmp_path, first_stage,
                                                             monkeypatch, no_report):
  first_workdir, first_summary = first_stage
  dataset = synthetic_dataset()
  monkeypatch.setattr(data_lib, "load", lambda cfg: dataset)
  config = second_stage_config(first_workdir)
  whole = trainer.train_and_evaluate(config, str(tmp_path / "whole"))
  assert whole["first_stage"]["fingerprint"] == first_summary["fingerprint"]
  assert whole["first_stage"]["step"] == first_summary["steps"]
  before = checkpointing.read_state_tree(first_workdir)[1]
  after = checkpointing.read_state_tree(tmp_path / "whole")[1]
  params_before, params_after = leaves(before["params"]), leaves(after["params"])
  changed = {k for k in params_before if not np.array_equal(params_before[k], params_after[k])}
  assert changed == {"['Dense_0']['bias']", "['Dense_0']['kernel']"}
  stats_before, stats_after = leaves(before["batch_stats"]), leaves(after["batch_stats"])
  assert all(np.array_equal(stats_before[k], stats_after[k]) for k in stats_before)
  # Stopped mid-epoch and resumed from its own checkpoint: the same bits.
  split = tmp_path / "split"
  assert trainer.train_and_evaluate(config, str(split), stop_at_step=5)["stopped_at_step"] == 5
  resumed = trainer.train_and_evaluate(config, str(split))
  assert resumed["resumed_from_step"] == 5
  assert resumed["fingerprint"] == whole["fingerprint"]


@pytest.mark.slow
def test_batchnorm_shift_reestimates_statistics_only(tmp_path, first_stage, monkeypatch,
                                                     no_report):
  first_workdir, _ = first_stage
  dataset = synthetic_dataset()
  monkeypatch.setattr(data_lib, "load", lambda cfg: dataset)
  trainer.train_and_evaluate(second_stage_config(first_workdir, stage2__batchnorm="shift",
                                                 num_epochs=1), str(tmp_path))
  before = checkpointing.read_state_tree(first_workdir)[1]
  after = checkpointing.read_state_tree(tmp_path)[1]
  params_before, params_after = leaves(before["params"]), leaves(after["params"])
  assert all(np.array_equal(params_before[k], params_after[k])
             for k in params_before if "Dense_0" not in k)
  stats_before, stats_after = leaves(before["batch_stats"]), leaves(after["batch_stats"])
  assert all(not np.array_equal(stats_before[k], stats_after[k]) for k in stats_before)


def test_configs_saved_before_the_second_stage_existed_still_resume():
  config = cifar10_lt.get_config("smoke")
  saved = run_identity.config_dict(config)
  del saved["stage2"], saved["optim"]["schedule"]
  for field in ("las_head", "las_tail", "las_shape"):
    del saved["loss"][field]
  assert run_identity.config_differences(saved, config) == {}
  config.optim.schedule = "cosine"  # Not what the saved run computed.
  assert run_identity.config_differences(saved, config) == {"optim.schedule": [None, "cosine"]}


@pytest.mark.slow
def test_two_stage_grid_smoke(tmp_path, cifar10_file, no_report):
  # configs/grids/two_stage.py:smoke: the first stage, then its three second
  # stages, each starting from the first stage's final state.
  del cifar10_file
  from configs.grids import two_stage as grid_config  # pylint: disable=g-import-not-at-top
  from lt_calib.experiments import grid as grid_lib  # pylint: disable=g-import-not-at-top
  grid = grid_config.get_config("smoke")
  grid.base.dataset.test_subset = 200
  grid.base.dataset.n_max, grid.base.batch_size = 625, 128  # helpers.TINY_OVERRIDES' split.
  rows = grid_lib.run_grid(grid, str(tmp_path))
  assert [(r["mix"], r["loss"]) for r in rows] == [
      ("unimix", "bayias"), ("stage2_random", "bayias"), ("stage2", "las"), ("stage2", "ce")]
  first = json.loads((tmp_path / "unimix__bayias__seed0" / "summary.json").read_text())
  for cell in ("stage2_random__bayias__seed0", "stage2__las__seed0", "stage2__ce__seed0"):
    summary = json.loads((tmp_path / cell / "summary.json").read_text())
    assert summary["first_stage"]["fingerprint"] == first["fingerprint"]
    assert summary["first_stage"]["workdir"] == str(tmp_path / "unimix__bayias__seed0")
    assert summary["config"]["stage2"]["enabled"] and summary["config"]["num_epochs"] == 1
  las = json.loads((tmp_path / "stage2__las__seed0" / "summary.json").read_text())
  assert (las["config"]["loss"]["name"], las["config"]["sampler"]["name"]) == (
      "las", "class_balanced")


def test_tiny_imagenet_two_stage_takes_the_many_class_settings():
  from configs import tiny_imagenet_lt  # pylint: disable=g-import-not-at-top
  config = tiny_imagenet_lt.get_config("rho100,two_stage")
  assert (config.stage2.enabled, config.num_epochs, config.dataset.imbalance_ratio) == (
      True, 10, 100.0)
  assert (config.loss.las_head, config.loss.las_tail, config.stage2.batchnorm) == (
      0.4, 0.1, "shift")
  assert tiny_imagenet_lt.get_config("smoke,two_stage").model.depth == 10
  with pytest.raises(ConfigError, match="two_stage"):
    tiny_imagenet_lt.get_config("smoke,three_stage")


def test_two_stage_grid_on_tiny_imagenet_builds_on_its_reduced_protocol():
  from configs.grids import tiny_imagenet  # pylint: disable=g-import-not-at-top
  from configs.grids import two_stage as grid_config  # pylint: disable=g-import-not-at-top
  grid = grid_config.get_config("cpu,dataset=tiny_imagenet")
  # The first stage is the Tiny grid's own CPU cell (ResNet-10 w16, 10 epochs), rho 100.
  assert grid.base.to_dict() == tiny_imagenet.base_config("cpu", rho=100.0).to_dict()
  assert (grid.base.dataset.num_classes, grid.base.model.depth, grid.base.model.width) == (
      200, 10, 16)
  stage2 = dict(grid.mix_presets.stage2)
  # CIFAR-100-LT's MiSLAS values (the many-class setting), as `:rho100,two_stage`.
  assert (stage2["loss.las_head"], stage2["loss.las_tail"], stage2["stage2.batchnorm"]) == (
      0.4, 0.1, "shift")
  assert stage2["stage2.first_stage"] == "unimix__bayias__seed{seed}"
  assert grid.seeds == (0, 1, 2)
