"""End-to-end training: outputs, resumption, 8-device sharding, bad input."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from lt_calib import checkpointing, config_checks
from lt_calib.train import loop, trainer
from lt_calib.errors import WorkdirError
from tests.conftest import REPO
from tests.helpers import tiny_config


def final_params(workdir):
  """Parameters of the latest checkpoint, read back without a target."""
  step, state = checkpointing.read_state_tree(workdir)
  return step, state["params"]


def assert_trees_close(a, b, **tolerance):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=str(path), **tolerance)


def test_run_writes_summary_and_metrics(tmp_path, cifar10_file):
  summary = trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2]
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["train_class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
  assert on_disk["steps"] == 2 * (12406 // 1024) == summary["steps"]
  final = on_disk["final"]
  for key in ("top1", "mean_class_acc", "many_acc", "medium_acc", "ece", "mce", "nll"):
    assert np.isfinite(final[key]), key
  assert final["few_acc"] is None  # No class has < 20 images at rho = 100.
  assert len(final["per_class_acc"]) == 10 and on_disk["config"]["mix"]["name"] == "unimix"
  assert on_disk["best_epoch_top1"]["epoch"] in (1, 2)
  # Provenance: the fingerprint of the final state, also in the checkpoint.
  assert len(on_disk["fingerprint"]) == 64
  assert on_disk["environment"]["device_count"] == jax.device_count()
  assert on_disk["environment"]["jax"] == jax.__version__
  manager = checkpointing.make_manager(tmp_path, 1, read_only=True)
  assert checkpointing.read_meta(manager, 24)["fingerprint"] == on_disk["fingerprint"]
  # Every log interval (4 steps) in train_metrics.jsonl, for scripts and tests.
  records = [json.loads(l) for l in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
  for record in records:
    assert {"step", "loss", "learning_rate", "images_per_second"} <= set(record)
  assert (tmp_path / "checkpoints").is_dir()


def test_fingerprint_sees_every_bit():
  state = SimpleNamespace(params={"w": np.ones((2, 3), np.float32)},
                          batch_stats={"mean": np.zeros(3, np.float32)})
  same = SimpleNamespace(params={"w": np.ones((2, 3), np.float32)},
                         batch_stats={"mean": np.zeros(3, np.float32)})
  assert checkpointing.fingerprint(state) == checkpointing.fingerprint(same)
  flipped = np.ones((2, 3), np.float32)
  flipped.view(np.uint32)[1, 2] ^= 1  # The lowest mantissa bit of one element.
  assert checkpointing.fingerprint(SimpleNamespace(
      params={"w": flipped}, batch_stats=same.batch_stats)) != checkpointing.fingerprint(state)
  moved = SimpleNamespace(params={"w": np.ones((3, 2), np.float32)},
                          batch_stats=same.batch_stats)  # Same bytes, other shape.
  assert checkpointing.fingerprint(moved) != checkpointing.fingerprint(state)


def test_resumed_run_matches_uninterrupted(tmp_path, cifar10_file):
  whole, split = tmp_path / "whole", tmp_path / "split"
  expected = trainer.train_and_evaluate(tiny_config(), str(whole))
  # Stopped mid-epoch (8 of 12 steps), as on preemption, then the same call.
  stopped = trainer.train_and_evaluate(tiny_config(), str(split), stop_at_step=8)
  assert stopped == {"stopped_at_step": 8, "reason": "stop_at_step"}
  assert checkpointing.read_state_tree(split)[0] == 8
  summary = trainer.train_and_evaluate(tiny_config(), str(split))
  assert summary["resumed_from_step"] == 8 and summary["steps_this_run"] == 16
  assert summary["fingerprint"] == expected["fingerprint"]  # Bit for bit.
  assert summary["final"]["top1"] == expected["final"]["top1"]
  losses = lambda d: [json.loads(l)["loss"]
                      for l in (d / "train_metrics.jsonl").read_text().splitlines()]
  assert losses(split) == losses(whole)  # One record per interval, none twice.


def test_two_fresh_runs_have_equal_fingerprints(tmp_path, cifar10_file):
  config = tiny_config(num_epochs=1)
  first = trainer.train_and_evaluate(config, str(tmp_path / "a"))
  second = trainer.train_and_evaluate(config, str(tmp_path / "b"))
  assert first["fingerprint"] == second["fingerprint"]
  other_seed = trainer.train_and_evaluate(tiny_config(num_epochs=1, seed=1),
                                        str(tmp_path / "c"))
  assert other_seed["fingerprint"] != first["fingerprint"]


def test_resume_with_a_changed_config_is_refused(tmp_path, cifar10_file):
  trainer.train_and_evaluate(tiny_config(), str(tmp_path), stop_at_step=4)
  with pytest.raises(WorkdirError, match=r"optim\.learning_rate: 0\.1 -> 0\.05.*"
                                         r"--allow_config_change"):
    trainer.train_and_evaluate(tiny_config(optim__learning_rate=0.05), str(tmp_path))
  # Bookkeeping fields (how often to log) change nothing that is computed.
  trainer.train_and_evaluate(tiny_config(log_every_steps=2), str(tmp_path), stop_at_step=6)
  summary = trainer.train_and_evaluate(tiny_config(optim__learning_rate=0.05), str(tmp_path),
                                     allow_config_change=True)
  assert summary["config_changes"] == [{"resumed_at_step": 6, "changes": {
      "optim.learning_rate": [0.1, 0.05]}}]
  record = json.loads((tmp_path / "run.json").read_text())
  assert record["data"]["sha256"] == hashlib.sha256(cifar10_file.read_bytes()).hexdigest()


def run_cli(workdir, devices):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  overrides = ["--config.model.width=4", "--config.batch_size=1024",
               "--config.dataset.test_subset=200", "--config.num_epochs=1"]
  subprocess.run([sys.executable, "-m", "lt_calib.main",
                  "--config=configs/cifar10_lt.py:smoke", f"--workdir={workdir}",
                  *overrides], cwd=REPO, env=env, check=True, capture_output=True)
  return json.loads(pathlib.Path(workdir, "summary.json").read_text())


def test_eight_devices_match_one(tmp_path, cifar10_file):
  one = run_cli(tmp_path / "one", 1)
  eight = run_cli(tmp_path / "eight", 8)
  assert len(one["devices"]) == 1 and len(eight["devices"]) == 8
  # Same global batch and keys; only the reduction order differs.
  for key in ("top1", "nll", "ece", "mean_class_acc"):
    np.testing.assert_allclose(eight["final"][key], one["final"][key], rtol=2e-3, atol=1e-4)
  np.testing.assert_allclose(eight["final"]["per_class_acc"], one["final"]["per_class_acc"],
                             atol=0.051)  # At most one of 20 images per class flips.


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, cifar10_file):
  trainer.train_and_evaluate(tiny_config(), str(tmp_path), stop_at_step=12)
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 1[3-9].*checkpoint \(step 12\)"):
    trainer.train_and_evaluate(tiny_config(optim__learning_rate=1e30), str(tmp_path),
                             allow_config_change=True)
  step, _ = final_params(tmp_path)
  assert step == 12


@pytest.mark.parametrize("field,value,message", [
    ("dataset__imbalance_ratio", 0.5, "imbalance_ratio must be >= 1"),
    ("mix__alpha", 0.0, "mix.alpha must be > 0"),
    ("mix__name", "cutmix", "mix.name='cutmix' is unknown; allowed"),
    ("mix__pairing", "random", "mix.pairing='random' is unknown"),
    ("loss__name", "hinge", "loss.name='hinge' is unknown; allowed"),
    ("model__name", "vit", "model.name='vit' is unknown"),
    ("dataset__name", "svhn", "dataset.name='svhn' is unknown"),
    ("batch_size", 1001, "multiple of the 8 devices"),
])
def test_config_errors_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(tiny_config(**{field: value}), num_devices=8)
