"""Training a run end to end: Algorithm 1 (UniMix + Bayias), data-parallel.

`train_and_evaluate` checks the config, loads the data, builds the compiled
functions (lt_calib/train/setup.py), restores the latest checkpoint, trains
(lt_calib/train/loop.py), and writes summary.json and the report.

Randomness: one `jax.random.key(seed)` gives the initial parameters, the
sampler's per-epoch permutations and a root folded with the global step for
everything else (`sampling.RunKeys`), so a resumed run draws the same
numbers as one that never stopped.
"""

import logging
import time

import jax
import ml_collections

from lt_calib import (checkpointing, compilation, config_checks, distributed, evaluation,
                      models, parallel, reporting, run_identity)
from lt_calib import data as data_lib
from lt_calib.calibration import report
from lt_calib.train import setup as setup_lib
from lt_calib.train import state as state_lib
from lt_calib.train import step as step_lib
from lt_calib.train import two_stage
from lt_calib.train.loop import Run, evaluate, evaluate_test_set, train_loop

# Exit status of a run stopped by SIGTERM (128 + 15, as a shell reports it).
PREEMPTED_EXIT_STATUS = 143


def describe(run: Run) -> None:
  """The console header: data, model, devices, steps, workdir (< 15 lines)."""
  config, dataset = run.config, run.dataset
  counts = dataset.prior.counts
  params = sum(x.size for x in jax.tree.leaves(run.state.params))
  print_line = run.console.line
  print_line(f"data: {dataset.source}")
  print_line(f"      {len(dataset.train_labels):,} train images in {len(counts)} classes "
             f"({int(counts.max())} to {int(counts.min())} per class), "
             f"{len(dataset.test_labels):,} test images")
  print_line(f"model: {config.model.name} depth {config.model.depth} width "
             f"{config.model.width} ({models.resolve_dtype_name(config.model.dtype)}), "
             f"{params:,} parameters; mix {config.mix.name}, loss {config.loss.name}")
  print_line(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in "
             f"{jax.process_count()} process(es); global batch {config.batch_size}, "
             f"learning rate {state_lib.base_learning_rate(config):g}")
  print_line(f"steps: {run.total_steps} ({config.num_epochs} epochs of "
             f"{run.steps_per_epoch})" + (f", resuming at step {run.start_step}"
                                           if run.start_step else ""))
  first = run.record.get("first_stage")
  if first:
    print_line(f"stage 2 after {first['workdir']} (step {first['step']}, top-1 "
               f"{100 * first['top1']:.2f} %): classifier only, BatchNorm "
               f"{config.stage2.batchnorm}")
  print_line(f"workdir: {run.workdir} (metrics.jsonl, summary.json, report.md)")


def prepare(config, workdir, allow_config_change: bool, mesh=None) -> Run:
  """Checks, loads data, builds, restores: everything before the first step."""
  config_checks.check_config(config, jax.device_count())
  workdir = run_identity.open_workdir(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  dataset = data_lib.load(config.dataset)
  identity = run_identity.data_identity(dataset)
  changes = run_identity.check(workdir, config, identity, allow_config_change)
  first_stage = two_stage.first_stage_record(config)  # None unless a second stage.
  two_stage.check_unchanged(workdir, first_stage)
  manager = checkpointing.make_manager(
      workdir, config.keep_checkpoints,
      save_interval_steps=config.checkpoint_every_epochs * step_lib.epoch_steps(config, dataset))
  latest = manager.latest_step()
  setup = setup_lib.build_for([config], dataset, mesh, start_step=latest or 0)
  state = setup.state
  if latest is not None:
    state = checkpointing.restore(manager, latest, state)
  elif first_stage is not None:
    state = two_stage.restore_first_stage(first_stage, state, mesh)
  start_step = int(parallel.local_value(state.step))
  is_main = distributed.is_main_process()
  record = run_identity.write(workdir, config, identity, changes, start_step,
                              first_stage=first_stage) if is_main else {}
  total_steps = config.num_epochs * setup.step_cfg.steps_per_epoch
  run = Run(config=config, workdir=workdir, dataset=dataset, setup=setup, mesh=mesh,
            manager=manager,
            writer=reporting.create_writer(str(workdir), config.tensorboard, is_main),
            console=reporting.Console(is_main, total_steps, start_step, config.batch_size),
            train_log=reporting.JsonLines(workdir / "train_metrics.jsonl", start_step,
                                          is_main),
            eval_log=reporting.JsonLines(workdir / "metrics.jsonl", start_step, is_main),
            state=state, start_step=start_step, total_steps=total_steps,
            last_checkpoint=latest, record=record)
  run.evaluations = list(run.eval_log.records)
  return run


def summary_record(config, run: Run, evaluations: list, state, wall_seconds: float) -> dict:
  """summary.json of one run: final figures, best epoch, counts, config, provenance.

  Args:
    config: the run's config.
    run: the Run that trained it (alone, or as one of K in one program).
    evaluations: the run's evaluation records, the final one last.
    state: the run's final state.
    wall_seconds: from the command to now.
  """
  dataset = run.dataset
  best = max(evaluations, key=lambda r: r["top1"])
  return {
      "final": evaluations[-1],
      "best_epoch_top1": {
          "top1": best["top1"], "epoch": best["epoch"], "step": best["step"],
          "note": "selected on the test set; for comparison with papers that report "
                  "it, not an unbiased estimate"},
      "train_class_counts": dataset.prior.counts.tolist(),
      "num_train_images": int(len(dataset.train_labels)),
      "num_test_images": int(len(dataset.test_labels)),
      "data_source": dataset.source,
      "config": run_identity.config_dict(config),
      "seed": config.seed,
      "compute_dtype": models.resolve_dtype_name(config.model.dtype),
      "base_learning_rate": state_lib.base_learning_rate(config),
      "steps": run.total_steps,
      "steps_this_run": run.total_steps - run.start_step,
      "resumed_from_step": run.start_step or None,
      "config_changes": run.record.get("config_changes", []),
      "first_stage": run.record.get("first_stage"),
      "data_identity": run.record.get("data"),
      "wall_time_s": wall_seconds,
      "train_images_per_s": run.console.images_per_second(),
      "fingerprint": checkpointing.fingerprint(state),
      "environment": checkpointing.environment(),
      "devices": [str(d) for d in jax.devices()],
      "jax_version": jax.__version__,
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False,
                       stop_at_step: int | None = None, mesh=None) -> dict:
  """Trains, evaluates and checkpoints; resumes from `workdir` if possible.

  Args:
    config: experiment config (see configs/).
    workdir: output directory (local or gs://): checkpoints/, config.json,
      run.json, train_metrics.jsonl, metrics.jsonl, summary.json, report.md,
      TensorBoard events. Only process 0 writes files besides checkpoints.
    allow_config_change: resume even if the workdir's saved config differs
      (the change is recorded in run.json and summary.json).
    stop_at_step: checkpoint and return at this step, as on preemption (with
      compiled chunks, at the end of the chunk that holds it).
    mesh: the device mesh (axis 'data'); default `parallel.make_mesh()`.

  Returns:
    The summary dict written to summary.json, or {'stopped_at_step': k,
    'reason': 'stop_at_step' | 'preempted'} when the run stopped early.
  """
  wall_start = time.time()
  cache = compilation.CacheCounter()
  run = prepare(config, workdir, allow_config_change, mesh)
  run.wall_start = wall_start
  describe(run)
  watcher = checkpointing.PreemptionWatcher()
  try:
    outcome = train_loop(run, stop_at_step, watcher)
  finally:
    watcher.close()
    run.console.close()
    run.manager.wait_until_finished()
    run.writer.flush()
  if outcome != "finished":
    run.manager.close()
    return {"stopped_at_step": int(parallel.local_value(run.state.step)), "reason": outcome}
  if not run.evaluations or run.evaluations[-1]["step"] != run.total_steps:
    evaluate(run, -(-run.total_steps // run.steps_per_epoch), run.total_steps)
  elif run.final_logits is None:
    # Resumed after the last evaluation: its logits, for the report only.
    run.final_logits = evaluation.split_logits(evaluate_test_set(run, keep_logits=True))
  validation = validation_logits(run)  # Every process takes part.
  summary = summary_record(run.config, run, run.evaluations, run.state,
                           time.time() - run.wall_start)
  summary["compilation_cache"] = cache.summary()
  if distributed.is_main_process():
    reporting.write_json(run.workdir / "summary.json", summary)
    report.write_training_report(run.workdir, run.config, run.final_logits,
                                 run.dataset.test_labels, run.dataset.prior.counts,
                                 summary["final"], validation)
  run.manager.close()
  run.writer.close()
  run.console.line(f"done: top-1 {100 * summary['final']['top1']:.2f} %, ECE "
                   f"{100 * summary['final']['ece']:.2f} %; {run.workdir / 'report.md'}")
  return summary


def validation_logits(run: Run):
  """(logits, labels) of the held-out split for temperature scaling, or None.

  Only when `dataset.val_per_class` > 0 (the in-memory CIFAR configs offer it).
  """
  per_class = int(run.config.dataset.get("val_per_class", 0) or 0)
  if per_class <= 0:
    return None
  batch = run.config.eval_batch_size
  try:
    labels, batches = run.dataset.validation_batches(
        per_class=per_class, global_batch=batch, rows=parallel.process_rows(run.mesh, batch))
  except FileNotFoundError as e:
    logging.warning("temperature scaling skipped: %s", e)
    return None
  result = evaluation.run(run.setup.eval_step, run.state, batches, len(labels), run.mesh,
                          batch, keep_logits=True)
  return evaluation.split_logits(result), labels
