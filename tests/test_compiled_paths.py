"""The fast paths train what the reference step loop trains.

- the compiled chunk (lax.scan over the step) equals the step loop for the
  same key, and how a run is cut into chunks changes no bit;
- a run stopped and resumed in chunks equals the uncut run bit for bit (in
  the step loop: test_streaming_train, test_cli_runs);
- K runs vmapped in one program equal their separately trained runs;
- bfloat16 compute reaches float32's accuracy within a stated tolerance.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lt_calib import checkpointing, parallel
from lt_calib import data as data_lib
from lt_calib.train import population, trainer
from lt_calib.train import setup as setup_lib
from tests.helpers import (skip_report, synthetic_config, synthetic_dataset, tiny_config,
                           train_records)


def trees_close(a, b, rtol, atol):
  for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                               jax.tree_util.tree_flatten_with_path(b)[0]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_compiled_epoch_equals_the_step_loop():
  dataset = synthetic_dataset()
  # Chunks of 4, as the next test's: the two share their compiled programs.
  config = synthetic_config(mix__name="unimix", steps_per_dispatch=4)
  setup = setup_lib.build_for([config], dataset, parallel.make_mesh())
  assert setup.chunk_steps == 4 and setup.step_cfg.steps_per_epoch == 11
  arrays, initial = setup.arrays, jax.tree.map(jnp.copy, setup.state)
  permutation = setup.feed.fed(0, setup.run_keys)
  # R's permutation of epoch 0, drawn once, is the one each step used to draw.
  np.testing.assert_array_equal(
      np.asarray(permutation),
      np.asarray(jax.random.permutation(jax.random.fold_in(
          jax.random.split(jax.random.key(config.seed), 3)[1], 0), len(dataset.train_labels))))

  state, losses = jax.tree.map(jnp.copy, initial), []
  for _ in range(4):
    state, stats = setup.update(state, permutation, *arrays)
    losses.append(float(stats["loss"]))
  whole, buffer = setup.run_chunk(jax.tree.map(jnp.copy, initial), permutation, *arrays)
  np.testing.assert_allclose(np.asarray(buffer["loss"]), losses, rtol=1e-5)
  trees_close(whole.params, state.params, rtol=1e-4, atol=1e-6)
  assert int(whole.step) == int(state.step) == 4 and buffer["loss"].shape == (4,)


def losses(workdir) -> list:
  return [r["loss"] for r in train_records(workdir)]


@pytest.mark.slow
def test_stopped_runs_resume_bit_for_bit_in_compiled_chunks(
    tmp_path, monkeypatch, no_report):
  dataset = synthetic_dataset()
  monkeypatch.setattr(data_lib, "load", lambda cfg: dataset)
  # The step loop, uncut: the reference for the chunks' records. (Its stops
  # land exactly where asked and resume bit for bit: test_streaming_train,
  # lt_calib.check's resume mode and the CLI's SIGTERM in test_cli_runs.)
  loop = synthetic_config(steps_per_dispatch=1, log_every_steps=2)
  trainer.train_and_evaluate(loop, str(tmp_path / "loop"))
  # Compiled chunks: 11 steps an epoch as two chunks of 4 and 3 single
  # steps; a stop asked at step 7 comes at the end of its chunk (8), so the
  # resumed run runs every step in the same program as an uncut one: the
  # same bits, and a record for every log step with the step loop's losses
  # (to float tolerance).
  chunked = synthetic_config(steps_per_dispatch=4, log_every_steps=2)
  stopped = trainer.train_and_evaluate(chunked, str(tmp_path / "chunks"), stop_at_step=7)
  assert stopped == {"stopped_at_step": 8, "reason": "stop_at_step"}
  assert checkpointing.read_state_tree(tmp_path / "chunks")[0] == 8
  summary = trainer.train_and_evaluate(chunked, str(tmp_path / "chunks"))
  assert summary["resumed_from_step"] == 8 and summary["steps_this_run"] == 25
  uncut = trainer.train_and_evaluate(chunked, str(tmp_path / "uncut"))
  assert summary["fingerprint"] == uncut["fingerprint"]  # Bit for bit.
  assert summary["final"]["top1"] == uncut["final"]["top1"]
  # One record per interval, none twice.
  assert losses(tmp_path / "chunks") == losses(tmp_path / "uncut")
  records, expected = train_records(tmp_path / "chunks"), train_records(tmp_path / "loop")
  # Every even step and each epoch's end (11, 22, 33), with the same losses.
  assert [r["step"] for r in records] == [r["step"] for r in expected] == sorted(
      set(range(2, 34, 2)) | {11, 22, 33})
  # Float tolerance: the two programs round differently, and 33 steps at
  # learning rate 0.1 carry it. On a 2-core AMD EPYC: losses 1.8e-5 apart
  # (relative) at step 32, parameters (of magnitude ~1) up to 5.8e-5 apart.
  np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in expected],
                             rtol=1e-4)
  _, a = checkpointing.read_state_tree(tmp_path / "chunks")
  _, b = checkpointing.read_state_tree(tmp_path / "loop")
  trees_close(a["params"], b["params"], rtol=1e-4, atol=2e-4)


@pytest.mark.slow
def test_vmapped_runs_equal_their_separate_runs(tmp_path, monkeypatch):
  # The separable synthetic set keeps this fast: XLA:CPU runs vmapped
  # convolutions (one kernel per member) several times slower than K single
  # ones, so the real :smoke data would take minutes here.
  dataset = synthetic_dataset()
  monkeypatch.setattr(data_lib, "load", lambda cfg: dataset)
  configs = [synthetic_config(seed=seed, num_epochs=2, eval_every_epochs=1)
             for seed in (0, 1)]
  assert population.can_share_program(configs)
  with monkeypatch.context() as patch:  # Only the members' reports are under test.
    skip_report(patch.setattr)
    alone = [trainer.train_and_evaluate(c, str(tmp_path / f"alone{c.seed}")) for c in configs]
  together = population.train_population(
      configs, [str(tmp_path / f"member{c.seed}") for c in configs], str(tmp_path / "group"))
  for k, (single, member) in enumerate(zip(alone, together)):
    for key in ("top1", "nll", "ece", "mean_class_acc"):
      np.testing.assert_allclose(member["final"][key], single["final"][key], rtol=1e-3,
                                 atol=1e-3, err_msg=f"member {k} {key}")
    _, a = checkpointing.read_state_tree(tmp_path / f"alone{k}")
    _, b = checkpointing.read_state_tree(tmp_path / f"member{k}")
    trees_close(b["params"], a["params"], rtol=1e-3, atol=1e-4)
    files = {p.name for p in (tmp_path / f"member{k}").iterdir()}
    assert {"summary.json", "metrics.jsonl", "train_metrics.jsonl", "config.json",
            "run.json", "checkpoints", "report.md", "reliability.png"} <= files
    np.testing.assert_allclose(losses(tmp_path / f"member{k}"), losses(tmp_path / f"alone{k}"),
                               rtol=1e-4)
    assert [r["epoch"] for r in map(json.loads, (tmp_path / f"member{k}" / "metrics.jsonl")
                                    .read_text().splitlines())] == [1, 2]
  assert len({m["fingerprint"] for m in together}) == 2  # Two different models.


def test_configs_differing_in_more_than_seeds_do_not_share_a_program():
  assert not population.can_share_program([tiny_config(), tiny_config(loss__name="ce")])
  assert population.can_share_program([tiny_config(), tiny_config(mix__alpha=0.8, seed=3)])


@pytest.mark.slow
def test_bfloat16_accuracy_is_within_tolerance_of_float32(tmp_path, monkeypatch,
                                                         no_report):
  # The same run (data, seed, schedule) with bfloat16 compute. bfloat16 keeps
  # 8 bits of mantissa (relative rounding 2^-9 ~ 0.2 % per operation), so
  # after a few hundred operations per logit the step's loss may move by a
  # few percent, and the final top-1 on 128 test images by a few images:
  # stated tolerance 5 points (6 images) of top-1, 0.05 nats of NLL, 5 % of
  # the first logged loss.
  dataset = synthetic_dataset()
  monkeypatch.setattr(data_lib, "load", lambda cfg: dataset)
  # Trained to convergence (the rate / 10 twice), so that what is compared is
  # the precision, not where two noisy trajectories happen to stop.
  settings = dict(mix__name="none", num_epochs=6, optim__warmup_epochs=0,
                  optim__decay_epochs=(3, 5), optim__decay_factors=(0.1, 0.01))
  f32 = trainer.train_and_evaluate(synthetic_config(**settings), str(tmp_path / "f32"))
  bf16 = trainer.train_and_evaluate(synthetic_config(model__dtype="bfloat16", **settings),
                                    str(tmp_path / "bf16"))
  assert f32["final"]["top1"] > 0.9  # Converged, far from chance (0.25).
  assert abs(bf16["final"]["top1"] - f32["final"]["top1"]) <= 0.05
  assert abs(bf16["final"]["nll"] - f32["final"]["nll"]) <= 0.05
  np.testing.assert_allclose(losses(tmp_path / "bf16")[0], losses(tmp_path / "f32")[0],
                             rtol=0.05)
  assert losses(tmp_path / "bf16") != losses(tmp_path / "f32")  # Really bfloat16 compute.
  _, state = checkpointing.read_state_tree(tmp_path / "bf16")
  # float32 parameters and BatchNorm statistics; bfloat16 only in the compute.
  for leaf in jax.tree.leaves((state["params"], state["batch_stats"])):
    assert np.asarray(leaf).dtype == np.float32
