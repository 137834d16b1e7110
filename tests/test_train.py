"""End-to-end training: outputs, resumption, bad input.

The outputs are those of the session's tiny CIFAR-10-LT run (`tiny_run`);
runs whose data is not under test train on the separable synthetic set.
"""

import hashlib
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from lt_calib import checkpointing, config_checks, parallel
from lt_calib import data as data_lib
from lt_calib.errors import WorkdirError
from lt_calib.train import loop, trainer
from lt_calib.train import setup as setup_lib
from tests.helpers import synthetic_config, synthetic_dataset, tiny_config, train_records


def final_params(workdir):
  """Parameters of the latest checkpoint, read back without a target."""
  step, state = checkpointing.read_state_tree(workdir)
  return step, state["params"]


@pytest.mark.slow
def test_run_writes_summary_and_metrics(tiny_run, cifar10_file):
  tmp_path, summary = tiny_run
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2]
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  # int(625 * 0.01 ** (c / 9)): the CIFAR-LT rule at n_max 625, rho 100.
  assert on_disk["train_class_counts"] == [625, 374, 224, 134, 80, 48, 29, 17, 10, 6]
  assert on_disk["steps"] == 2 * (1547 // 128) == summary["steps"] == 24
  final = on_disk["final"]
  for key in ("top1", "mean_class_acc", "many_acc", "medium_acc", "few_acc", "ece", "mce",
              "nll"):
    assert np.isfinite(final[key]), key
  # Few-shot: the classes under 20 images (7, 8, 9), 20 test images each.
  assert final["few_acc"] == pytest.approx(np.mean(final["per_class_acc"][7:]))
  assert len(final["per_class_acc"]) == 10 and on_disk["config"]["mix"]["name"] == "unimix"
  assert on_disk["best_epoch_top1"]["epoch"] in (1, 2)
  # Provenance: the fingerprint of the final state, also in the checkpoint.
  assert len(on_disk["fingerprint"]) == 64
  assert on_disk["environment"]["device_count"] == jax.device_count()
  assert on_disk["environment"]["jax"] == jax.__version__
  manager = checkpointing.make_manager(tmp_path, 1, read_only=True)
  assert checkpointing.read_meta(manager, 24)["fingerprint"] == on_disk["fingerprint"]
  # Every log interval (4 steps) in train_metrics.jsonl, for scripts and tests.
  records = train_records(tmp_path)
  assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
  for record in records:
    assert {"step", "loss", "learning_rate", "images_per_second"} <= set(record)
  assert (tmp_path / "checkpoints").is_dir()
  record = json.loads((tmp_path / "run.json").read_text())
  assert record["data"]["sha256"] == hashlib.sha256(cifar10_file.read_bytes()).hexdigest()


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


@pytest.fixture
def synthetic_data(monkeypatch):
  """Runs in this test load the separable synthetic set, whatever the config says."""
  dataset = synthetic_dataset()
  monkeypatch.setattr(data_lib, "load", lambda cfg: dataset)
  return dataset


def test_another_seed_starts_from_other_parameters():
  # That one seed repeats bit for bit: a fresh process ends with the bits of
  # the session's run (test_cli_runs.py's SIGTERM-then-SIGKILL sequence).
  dataset, mesh = synthetic_dataset(), parallel.make_mesh()
  states = [setup_lib.build_for([synthetic_config(seed=seed)], dataset, mesh).state
            for seed in (0, 0, 1)]
  fingerprints = [checkpointing.fingerprint(s) for s in states]
  assert fingerprints[0] == fingerprints[1] != fingerprints[2]


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused(tmp_path, synthetic_data, no_report):
  trainer.train_and_evaluate(synthetic_config(), str(tmp_path), stop_at_step=4)
  with pytest.raises(WorkdirError, match=r"optim\.learning_rate: 0\.1 -> 0\.05.*"
                                         r"--allow_config_change"):
    trainer.train_and_evaluate(synthetic_config(optim__learning_rate=0.05), str(tmp_path))
  # Bookkeeping fields (how often to log) change nothing that is computed.
  trainer.train_and_evaluate(synthetic_config(log_every_steps=2), str(tmp_path),
                             stop_at_step=6)
  summary = trainer.train_and_evaluate(synthetic_config(optim__learning_rate=0.05),
                                       str(tmp_path), allow_config_change=True)
  assert summary["config_changes"] == [{"resumed_at_step": 6, "changes": {
      "optim.learning_rate": [0.1, 0.05]}}]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, synthetic_data):
  trainer.train_and_evaluate(synthetic_config(), str(tmp_path), stop_at_step=11)
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 1[2-9].*checkpoint \(step 11\)"):
    trainer.train_and_evaluate(synthetic_config(optim__learning_rate=1e30), str(tmp_path),
                               allow_config_change=True)
  step, _ = final_params(tmp_path)
  assert step == 11


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
