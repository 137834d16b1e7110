"""Training and evaluation loop: Algorithm 1 (UniMix + Bayias), data-parallel.

The step (lt_calib/steps.py) is compiled once over global arrays sharded on
the mesh's 'data' axis, on every device of every process. In-memory datasets
live on the devices and are sampled there; by default a whole stretch of
steps (up to the next log line or epoch end) runs as one compiled
`lax.fori_loop`, so the host dispatches once per stretch instead of once per
step. Streamed datasets (tf.data) are fed one global batch per step, each
process its own rows.

BatchNorm statistics are over the global batch, because the mean inside the
jitted step is a mean over the whole (sharded) batch axis.

Randomness: one `jax.random.key(seed)` gives the initial parameters, the
sampler's per-epoch permutations and a root folded with the global step for
everything else, so a resumed run draws the same numbers as one that never
stopped; the streamed index sequence is a function of (seed, step) too.
"""

import dataclasses
import functools
import itertools
import logging
import time
from typing import Any, Callable, NamedTuple

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lt_calib import (checkpointing, config_checks, distributed, evaluation, losses, models,
                      parallel, reporting, run_record, steps, storage)
from lt_calib import data as data_lib
from lt_calib.calibration import report
from lt_calib.errors import UserError, WorkdirError

# Exit status of a run stopped by SIGTERM (128 + 15, as a shell reports it).
PREEMPTED_EXIT_STATUS = 143


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss became NaN or infinite."""


class Setup(NamedTuple):
  """A run's compiled functions, initial state and device-resident inputs."""
  update: Callable   # One step: (state, *arrays) or (state, batch, *arrays).
  run_chunk: Callable | None  # In memory: (state, num_steps, *arrays) -> (state, stats[max]).
  eval_step: Callable  # evaluation.make_step: (state, images, labels, index) -> (stats, logits).
  state: Any
  arrays: tuple      # In memory: (images, labels, step_cfg, run_keys); else (step_cfg, run_keys).
  step_cfg: steps.StepConfig
  streaming: bool


def chunk_runner(one_step: Callable, max_steps: int) -> Callable:
  """`num_steps` (traced, <= max_steps) applications of `one_step` in one program.

  Args:
    one_step: (state, *args) -> (state, dict of scalar statistics).
    max_steps: static size of the per-step statistics buffer.

  Returns:
    (state, num_steps, *args) -> (state, statistics [max_steps, ...]); rows
    past `num_steps` are zeros. The loop body is the same program whatever
    `num_steps` is, so how a run is cut into chunks never changes its numbers.
  """

  def run(state, num_steps, *args):
    stats_shape = jax.eval_shape(one_step, state, *args)[1]
    buffer = jax.tree.map(lambda s: jnp.zeros((max_steps,) + s.shape, s.dtype),
                          stats_shape)

    def body(i, carry):
      state, buffer = carry
      state, stats = one_step(state, *args)
      return state, jax.tree.map(lambda b, s: b.at[i].set(s), buffer, stats)

    return jax.lax.fori_loop(0, num_steps, body, (state, buffer))

  return run


def make_one_step(loss_fn, schedule, mesh, streaming: bool) -> Callable:
  """The un-jitted global step: batch preparation, `steps.train_step`, lr.

  In memory: (state, images, labels, step_cfg, run_keys); streamed:
  (state, batch, step_cfg, run_keys) with `batch` the uint8 global batch.
  """
  data_sharded = parallel.data_sharding(mesh)

  def finish(state, batch, mix_key, step_cfg):
    batch = jax.lax.with_sharding_constraint(batch, data_sharded)
    new_state, stats = steps.train_step(state, batch, mix_key, step_cfg, loss_fn)
    stats["learning_rate"] = schedule(state.step)
    return new_state, stats

  if streaming:
    def one_step(state, batch, step_cfg, run_keys):
      batch_key, mix_key = jax.random.split(jax.random.fold_in(run_keys[2], state.step))
      return finish(state, steps.streamed_batch(batch, batch_key, step_cfg), mix_key,
                    step_cfg)
    return one_step

  def one_step(state, train_images, train_labels, step_cfg, run_keys):
    data_key, step_root = run_keys[1], run_keys[2]
    batch_key, mix_key = jax.random.split(jax.random.fold_in(step_root, state.step))
    batch = steps.prepare_batch(train_images, train_labels, state.step, batch_key,
                                data_key, step_cfg)
    return finish(state, batch, mix_key, step_cfg)
  return one_step


def steps_per_dispatch(config, steps_per_epoch: int) -> int:
  """Most steps one dispatch runs (`config.steps_per_dispatch`).

  1 is the step loop (one jitted step per dispatch); more runs
  `chunk_runner`'s compiled loop, whose buffer this sizes. 0 picks what is
  faster on the backend: an epoch on accelerators, the step loop on CPUs,
  where XLA (jaxlib 0.10) leaves the weight-gradient convolutions inside a
  while loop in a layout its fast convolution kernels do not take and runs
  them ~15x slower (measured: 16 vs 250 images/s, docs/benchmarks.md).
  """
  requested = int(config.get("steps_per_dispatch", 0))
  if requested <= 0:
    return 1 if jax.default_backend() == "cpu" else steps_per_epoch
  return min(requested, steps_per_epoch)


def build(config, dataset, mesh) -> Setup:
  """Builds the model, optimizer, initial state and the compiled functions.

  Args:
    config: experiment config.
    dataset: `sources.Dataset` (in memory) or `pipeline.StreamingDataset`.
    mesh: device mesh with a 'data' axis.

  Returns:
    Setup.
  """
  replicated = parallel.replicated(mesh)
  streaming = not hasattr(dataset, "train_images")
  step_cfg = steps.make_step_config(config, dataset)
  loss_fn = losses.make_loss(config.loss, dataset.prior, step_cfg.steps_per_epoch,
                             models.logit_scale(config.model))
  tx, schedule = steps.make_optimizer(config, step_cfg.steps_per_epoch)
  model = models.create_model(config.model, dataset.info.num_classes)
  # One key for the run: init, the sampler's epoch permutations, and a root
  # folded with the global step. They enter the step as an argument, not as
  # constants, so runs that differ only in the seed compile to one program.
  run_keys = jax.random.split(jax.random.key(config.seed), 3)
  state = steps.create_train_state(run_keys[0], model, dataset.image_shape, tx)
  one_step = make_one_step(loss_fn, schedule, mesh, streaming)
  jit = functools.partial(jax.jit, donate_argnums=(0,),
                          out_shardings=(replicated, replicated))
  update = jit(one_step)
  max_steps = steps_per_dispatch(config, step_cfg.steps_per_epoch)
  run_chunk = None if streaming or max_steps == 1 else jit(chunk_runner(one_step, max_steps))
  eval_step = evaluation.make_step(
      functools.partial(steps.eval_step, mean=dataset.info.mean, std=dataset.info.std),
      dataset.info.num_classes, config.calibration_bins, mesh)
  arrays = (step_cfg, run_keys) if streaming else (
      dataset.train_images, dataset.train_labels, step_cfg, run_keys)
  return Setup(update, run_chunk, eval_step, parallel.replicate(state, mesh),
               parallel.replicate(arrays, mesh), step_cfg, streaming)


@dataclasses.dataclass
class Run:
  """Everything the loop functions share for one training run."""
  config: ml_collections.ConfigDict
  workdir: Any                    # epath.Path
  dataset: Any
  setup: Setup
  mesh: Any
  manager: Any
  console: reporting.Console
  writer: Any
  train_log: reporting.JsonLines
  eval_log: reporting.JsonLines
  state: Any
  start_step: int
  total_steps: int
  last_checkpoint: int | None
  record: dict = dataclasses.field(default_factory=dict)  # run.json (process 0).
  wall_start: float = dataclasses.field(default_factory=time.time)
  train_batches: Any = None       # Streamed: iterator of this process's rows.
  evaluations: list = dataclasses.field(default_factory=list)
  final_logits: np.ndarray | None = None  # [M, C] of the latest evaluation that kept them.

  @property
  def steps_per_epoch(self) -> int:
    return self.setup.step_cfg.steps_per_epoch


def advance(run: Run, num_steps: int) -> dict:
  """Trains `num_steps` more steps; returns the per-step statistics [n, ...]."""
  setup = run.setup
  if setup.run_chunk is not None:
    run.state, buffer = setup.run_chunk(run.state, jnp.int32(num_steps), *setup.arrays)
    return {k: parallel.local_value(v)[:num_steps] for k, v in buffer.items()}
  history = []
  for _ in range(num_steps):  # Dispatches run ahead; nothing blocks until the end.
    if setup.streaming:
      batch = parallel.to_global(next(run.train_batches), run.mesh, run.config.batch_size)
      run.state, stats = setup.update(run.state, batch, *setup.arrays)
    else:
      run.state, stats = setup.update(run.state, *setup.arrays)
    history.append(stats)
  return {k: np.stack([parallel.local_value(s[k]) for s in history]) for k in history[0]}


def next_boundary(done: int, run: Run, stop_at_step: int | None) -> int:
  """The next step at which the host must look: log, epoch end, stop, end."""
  log_every, spe = run.config.log_every_steps, run.steps_per_epoch
  candidates = [(done // log_every + 1) * log_every, (done // spe + 1) * spe,
                run.total_steps]
  if stop_at_step is not None and stop_at_step > done:
    candidates.append(stop_at_step)
  return min(candidates)


def check_finite(stats: dict, first_step: int, last_checkpoint) -> None:
  """Raises NonFiniteLossError at the first step whose loss is not finite."""
  bad = np.flatnonzero(~np.isfinite(stats["loss"].reshape(len(stats["loss"]), -1)).all(1))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    raise NonFiniteLossError(
        f"training loss is not finite at step {step}; stopping. The last good "
        f"checkpoint (step {last_checkpoint}) is kept in the workdir. Lower "
        "optim.learning_rate or check the data and the loss settings.")


def log_interval(run: Run, done: int, stats: dict) -> None:
  """One progress line and one train_metrics.jsonl record at step `done`.

  Statistics of K runs in one program (population.py) have a member axis:
  the console shows their mean, the record keeps one value per member.
  """
  last = {k: np.asarray(v[-1]) for k, v in stats.items()}
  means = {k: float(np.mean(v)) for k, v in last.items()}
  speed = run.console.progress(done, (done - 1) // run.steps_per_epoch + 1, means)
  record = {"step": done, "epoch": done / run.steps_per_epoch,
            **{k: v.tolist() if v.ndim else float(v) for k, v in last.items()},
            "images_per_second": speed["images_per_second"],
            "elapsed_s": time.time() - run.wall_start}
  run.train_log.append(record)
  run.writer.write_scalars(done, {**means, "epoch": record["epoch"],
                                  "images_per_second": speed["images_per_second"]})


def evaluate_test_set(run: Run, keep_logits: bool) -> evaluation.Result:
  """Statistics (and this process's logits) of the test split."""
  config = run.config
  rows = parallel.process_rows(run.mesh, config.eval_batch_size)
  batches = run.dataset.eval_batches(global_batch=config.eval_batch_size, rows=rows)
  return evaluation.run(run.setup.eval_step, run.state, batches,
                        len(run.dataset.test_labels), run.mesh, config.eval_batch_size,
                        keep_logits)


def evaluate(run: Run, epoch: int, step: int) -> dict:
  """Test metrics of the current state; written by process 0.

  One process keeps the logits of the test set (ACE, TACE); several
  processes keep none but at the end of training (`finish`).
  """
  dataset, config = run.dataset, run.config
  result = evaluate_test_set(run, keep_logits=jax.process_count() == 1
                             or step == run.total_steps)
  logits = evaluation.split_logits(result) if result.logits is not None else None
  record = evaluation.summarize(result.statistics, dataset.prior.counts, logits,
                                dataset.test_labels, config.calibration_bins)
  record.update(epoch=epoch, step=step)
  run.evaluations.append(record)
  run.final_logits = logits
  run.eval_log.append(record)
  run.writer.write_scalars(step, {f"test/{k}": v for k, v in record.items()
                                  if isinstance(v, float)})
  run.console.line(f"eval epoch {epoch}: top-1 {100 * record['top1']:.2f} % "
                   f"ECE {100 * record['ece']:.2f} % NLL {record['nll']:.4f}")
  return record


def save_checkpoint(run: Run, step: int) -> None:
  if run.last_checkpoint != step:
    checkpointing.save(run.manager, step, run.state)
    run.last_checkpoint = step


def train_loop(run: Run, stop_at_step: int | None, watcher, evaluate_fn=None) -> str:
  """Trains to the end; returns 'finished', 'stop_at_step' or 'preempted'.

  Args:
    run: the prepared Run.
    stop_at_step: checkpoint and stop at this step (None: never).
    watcher: checkpointing.PreemptionWatcher (SIGTERM).
    evaluate_fn: (run, epoch, step) -> None at each evaluation; `evaluate`
      by default (population.py passes its per-member one).
  """
  evaluate_fn = evaluate_fn or evaluate
  config, spe, done = run.config, run.steps_per_epoch, run.start_step
  run.console.start()
  # JAX's preemption sync point is one past the largest counter any host
  # reported, and only that exact value matches: the counter must advance by
  # one per boundary, the same on every host (the global step jumps).
  for boundary in itertools.count(1):
    if done >= run.total_steps:
      break
    target = next_boundary(done, run, stop_at_step)
    stats = advance(run, target - done)
    check_finite(stats, done, run.last_checkpoint)
    done = target
    epoch_end = done % spe == 0 or done == run.total_steps
    if done % config.log_every_steps == 0 or epoch_end:
      log_interval(run, done, stats)
    if epoch_end:
      epoch = -(-done // spe)
      if epoch % config.eval_every_epochs == 0 or done == run.total_steps:
        evaluate_fn(run, epoch, done)
      if epoch % config.checkpoint_every_epochs == 0 or done == run.total_steps:
        save_checkpoint(run, done)
    preempted = watcher.reached(boundary)  # Asked at every boundary, on every host.
    reason = ("stop_at_step" if done == stop_at_step else
              "preempted" if preempted else None)
    if reason and done < run.total_steps:
      save_checkpoint(run, done)
      run.manager.wait_until_finished()
      run.console.line(f"stopped at step {done} ({reason}); checkpoint saved in "
                       f"{run.workdir / 'checkpoints'}; rerun the same command to resume.")
      return reason
  return "finished"


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
             f"learning rate {steps.base_learning_rate(config):g}")
  print_line(f"steps: {run.total_steps} ({config.num_epochs} epochs of "
             f"{run.steps_per_epoch})" + (f", resuming at step {run.start_step}"
                                           if run.start_step else ""))
  print_line(f"workdir: {run.workdir} (metrics.jsonl, summary.json, report.md)")


def open_workdir(workdir) -> epath.Path:
  """The workdir as a path, created if needed (local folders checked first)."""
  workdir = storage.as_path(workdir)
  if not storage.is_remote(workdir) and workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a folder; choose a folder.")
  workdir.mkdir(parents=True, exist_ok=True)
  return workdir


def prepare(config, workdir, allow_config_change: bool, mesh=None) -> Run:
  """Checks, loads data, builds, restores: everything before the first step."""
  config_checks.check_config(config, jax.device_count())
  workdir = open_workdir(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  dataset = data_lib.load(config.dataset)
  identity = run_record.data_identity(dataset)
  changes = run_record.check(workdir, config, identity, allow_config_change)
  setup = build(config, dataset, mesh)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  state, latest = setup.state, manager.latest_step()
  if latest is not None:
    state = checkpointing.restore(manager, latest, state)
  start_step = int(parallel.local_value(state.step))
  is_main = distributed.is_main_process()
  record = run_record.write(workdir, config, identity, changes, start_step) if is_main else {}
  run = Run(config=config, workdir=workdir, dataset=dataset, setup=setup, mesh=mesh,
            manager=manager, writer=reporting.create_writer(str(workdir),
                                                            config.tensorboard, is_main),
            console=reporting.Console(is_main, config.num_epochs
                                      * setup.step_cfg.steps_per_epoch, start_step,
                                      config.batch_size),
            train_log=reporting.JsonLines(workdir / "train_metrics.jsonl", start_step,
                                          is_main),
            eval_log=reporting.JsonLines(workdir / "metrics.jsonl", start_step, is_main),
            state=state, start_step=start_step,
            total_steps=config.num_epochs * setup.step_cfg.steps_per_epoch,
            last_checkpoint=latest, record=record)
  run.evaluations = list(run.eval_log.records)
  if setup.streaming:
    run.train_batches = _streamed_train_batches(run)
  return run


def _streamed_train_batches(run: Run):
  cfg = run.setup.step_cfg
  partner = None
  if cfg.mix_factor is not None and cfg.mix_space == "input" and cfg.pairing == "sampler":
    partner = np.asarray(cfg.log_class_probs)
  main = None if cfg.batch_log_class_probs is None else np.asarray(cfg.batch_log_class_probs)
  return run.dataset.train_batches(
      seed=int(run.config.seed), start_step=run.start_step,
      global_batch=run.config.batch_size,
      rows=parallel.process_rows(run.mesh, run.config.batch_size),
      main_log_class_probs=main, partner_log_class_probs=partner,
      partner_until_step=cfg.mix_stop_step)


def summarize(run: Run, wall_seconds: float) -> dict:
  """summary.json: final figures, best epoch, counts, config, provenance."""
  config, dataset = run.config, run.dataset
  best = max(run.evaluations, key=lambda r: r["top1"])
  return {
      "final": run.evaluations[-1],
      "best_epoch_top1": {
          "top1": best["top1"], "epoch": best["epoch"], "step": best["step"],
          "note": "selected on the test set; for comparison with papers that report "
                  "it, not an unbiased estimate"},
      "train_class_counts": dataset.prior.counts.tolist(),
      "num_train_images": int(len(dataset.train_labels)),
      "num_test_images": int(len(dataset.test_labels)),
      "data_source": dataset.source,
      "config": run_record.config_dict(config),
      "seed": config.seed,
      "compute_dtype": models.resolve_dtype_name(config.model.dtype),
      "base_learning_rate": steps.base_learning_rate(config),
      "steps": run.total_steps,
      "steps_this_run": run.total_steps - run.start_step,
      "resumed_from_step": run.start_step or None,
      "config_changes": run.record.get("config_changes", []),
      "data_identity": run.record.get("data"),
      "wall_time_s": wall_seconds,
      "train_images_per_s": run.console.images_per_second(),
      "fingerprint": checkpointing.fingerprint(run.state),
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
    stop_at_step: checkpoint and return at this step, as on preemption.
    mesh: the device mesh (axis 'data'); default `parallel.make_mesh()`.

  Returns:
    The summary dict written to summary.json, or {'stopped_at_step': k,
    'reason': 'stop_at_step' | 'preempted'} when the run stopped early.
  """
  wall_start = time.time()
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
  summary = summarize(run, time.time() - run.wall_start)
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

  Only in-memory CIFAR data has that split (`dataset.val_per_class` > 0).
  """
  per_class = int(run.config.dataset.get("val_per_class", 0) or 0)
  if per_class <= 0 or run.setup.streaming:
    return None
  try:
    images, labels = data_lib.sources.load_validation_split(run.config.dataset, per_class)
  except FileNotFoundError as e:
    logging.warning("temperature scaling skipped: %s", e)
    return None
  batch = run.config.eval_batch_size
  batches = data_lib.sources.padded_batches(
      images, labels, batch, parallel.process_rows(run.mesh, batch))
  result = evaluation.run(run.setup.eval_step, run.state, batches, len(labels), run.mesh,
                          batch, keep_logits=True)
  return evaluation.split_logits(result), labels
