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

from lt_calib import (checkpointing, compilation, config_checks, distributed, evaluation,
                      losses, models, parallel, reporting, run_record, steps, storage)
from lt_calib import data as data_lib
from lt_calib.calibration import report
from lt_calib.data import sampling
from lt_calib.errors import UserError, WorkdirError

# Exit status of a run stopped by SIGTERM (128 + 15, as a shell reports it).
PREEMPTED_EXIT_STATUS = 143


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss became NaN or infinite."""


class RunKeys(NamedTuple):
  """The run's keys, all from `jax.random.key(seed)`.

  They enter the step as arguments, not constants, so runs that differ only
  in the seed compile to one program.
  """
  init: jax.Array  # Initial parameters.
  data: jax.Array  # The sampler R's epoch permutations (epoch number folded in).
  step: jax.Array  # Folded with the global step: partners, augmentation, mixing.

  @classmethod
  def from_seed(cls, seed: int) -> "RunKeys":
    return cls(*jax.random.split(jax.random.key(seed), 3))


class Setup(NamedTuple):
  """A run's compiled functions, initial state and device-resident inputs.

  Every training function takes (state, fed, *arrays): `fed` is what the
  host hands over per dispatch (in memory: the epoch's permutation of the
  training set, computed once per epoch by `epoch_inputs`; streamed: the
  global batch), `arrays` what stays on the devices for the whole run.
  """
  update: Callable     # One step -> (state, stats).
  run_chunk: Callable | None  # In memory: `chunk_steps` steps -> (state, stats[chunk_steps]).
  chunk_steps: int     # Static trip count of run_chunk (1: no chunk).
  epoch_inputs: Callable | None  # In memory: (run keys, epoch) -> permutation, on the devices.
  eval_step: Callable  # evaluation.make_step: (state, images, labels, index) -> (stats, logits).
  state: Any
  arrays: tuple        # In memory: (images, labels, step_cfg, run_keys); else (step_cfg, run_keys).
  step_cfg: steps.StepConfig
  streaming: bool


def chunk_runner(one_step: Callable, num_steps: int) -> Callable:
  """`num_steps` (static) applications of `one_step` in one program.

  Args:
    one_step: (state, *args) -> (state, dict of scalar statistics).
    num_steps: the trip count, fixed when the program is traced: XLA runs a
      loop of known length without asking the host after every iteration.

  Returns:
    (state, *args) -> (state, statistics stacked [num_steps, ...]); the body
    is `one_step` itself, so a chunk computes exactly what as many single
    steps compute.
  """

  def run(state, *args):
    def body(carry, _):
      return one_step(carry, *args)
    return jax.lax.scan(body, state, None, length=num_steps)

  return run


def make_one_step(loss_fn, schedule, mesh, streaming: bool) -> Callable:
  """The un-jitted global step: batch preparation, `steps.train_step`, lr.

  In memory: (state, permutation, images, labels, step_cfg, run_keys), the
  permutation being the epoch's (`make_epoch_inputs`); streamed: (state,
  batch, step_cfg, run_keys) with `batch` the uint8 global batch.
  """
  data_sharded = parallel.data_sharding(mesh)

  def finish(state, batch, mix_key, step_cfg):
    batch = jax.lax.with_sharding_constraint(batch, data_sharded)
    new_state, stats = steps.train_step(state, batch, mix_key, step_cfg, loss_fn)
    stats["learning_rate"] = schedule(state.step)
    return new_state, stats

  if streaming:
    def one_step(state, batch, step_cfg, run_keys):
      batch_key, mix_key = jax.random.split(jax.random.fold_in(run_keys.step, state.step))
      return finish(state, steps.streamed_batch(batch, batch_key, step_cfg), mix_key,
                    step_cfg)
    return one_step

  def one_step(state, permutation, train_images, train_labels, step_cfg, run_keys):
    batch_key, mix_key = jax.random.split(jax.random.fold_in(run_keys.step, state.step))
    batch = steps.prepare_batch(train_images, train_labels, state.step, batch_key,
                                permutation, step_cfg)
    return finish(state, batch, mix_key, step_cfg)
  return one_step


def steps_per_dispatch(config, steps_per_epoch: int) -> int:
  """Steps of one compiled chunk (`config.steps_per_dispatch`), at most an epoch's.

  1 is the step loop (one jitted step per dispatch); more runs
  `chunk_runner`'s compiled loop of that many steps, and what is left of an
  epoch (or of a stretch that a stop cuts) one step at a time. 0 picks what
  is faster on the backend: a whole epoch on accelerators, the step loop on
  CPUs, where XLA (jaxlib 0.10) leaves the weight-gradient convolutions
  inside a loop in a layout its fast convolution kernels do not take and
  runs them ~15x slower (measured: 16 vs 250 images/s, docs/benchmarks.md).
  """
  requested = int(config.get("steps_per_dispatch", 0))
  if requested <= 0:
    return 1 if jax.default_backend() == "cpu" else steps_per_epoch
  return min(requested, steps_per_epoch)


def make_epoch_inputs(num_examples: int, mesh, members: bool = False) -> Callable:
  """(run keys, epoch) -> the sampler R's permutation of that epoch, replicated.

  Drawn once per epoch (a sort of N keys), not inside every step.
  """
  def permutation(run_keys, epoch):
    return sampling.epoch_permutation(run_keys.data, epoch, num_examples)

  if members:
    permutation = jax.vmap(permutation, in_axes=(0, None))
  return jax.jit(permutation, out_shardings=parallel.replicated(mesh))


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
  run_keys = RunKeys.from_seed(config.seed)
  state = steps.create_train_state(run_keys.init, model, dataset.image_shape, tx)
  one_step = make_one_step(loss_fn, schedule, mesh, streaming)
  jit = functools.partial(jax.jit, donate_argnums=(0,),
                          out_shardings=(replicated, replicated))
  chunk = 1 if streaming else steps_per_dispatch(config, step_cfg.steps_per_epoch)
  eval_step = evaluation.make_step(
      functools.partial(steps.eval_step, mean=dataset.info.mean, std=dataset.info.std),
      dataset.info.num_classes, config.calibration_bins, mesh)
  arrays = (step_cfg, run_keys) if streaming else (
      dataset.train_images, dataset.train_labels, step_cfg, run_keys)
  return Setup(jit(one_step), None if chunk == 1 else jit(chunk_runner(one_step, chunk)),
               chunk, None if streaming else make_epoch_inputs(step_cfg.num_examples, mesh),
               eval_step, parallel.replicate(state, mesh), parallel.replicate(arrays, mesh),
               step_cfg, streaming)


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
  fed: Any = None                 # In memory: the permutation of epoch `fed_epoch`.
  fed_epoch: int | None = None
  evaluations: list = dataclasses.field(default_factory=list)
  final_logits: np.ndarray | None = None  # [M, C] of the latest evaluation that kept them.

  @property
  def steps_per_epoch(self) -> int:
    return self.setup.step_cfg.steps_per_epoch


def epoch_fed(run: Run, step: int):
  """The in-memory step's per-dispatch input at `step`: its epoch's permutation."""
  epoch = step // run.steps_per_epoch
  if run.fed_epoch != epoch:
    run.fed = run.setup.epoch_inputs(run.setup.arrays[-1], epoch)
    run.fed_epoch = epoch
  return run.fed


def advance(run: Run, done: int, num_steps: int) -> dict:
  """Trains `num_steps` steps from step `done`; returns the per-step statistics [n, ...].

  In memory, the stretch runs as whole compiled chunks, then single steps
  for what remains of the epoch (when the chunk does not divide it); every
  stretch starts at an epoch's start or a chunk's end (`next_boundary`), so
  each step runs in the same program however the run was cut, and a resumed
  run computes the same bits. Streamed: one step per batch.
  """
  setup, history = run.setup, []
  if setup.streaming:
    for _ in range(num_steps):  # Dispatches run ahead; nothing blocks until the end.
      batch = parallel.to_global(next(run.train_batches), run.mesh, run.config.batch_size)
      run.state, stats = setup.update(run.state, batch, *setup.arrays)
      history.append(jax.tree.map(lambda x: x[None], stats))
  else:
    fed = epoch_fed(run, done)  # A stretch never crosses an epoch's end.
    chunks, singles = divmod(num_steps, setup.chunk_steps) if setup.run_chunk else (0, num_steps)
    for _ in range(chunks):
      run.state, stats = setup.run_chunk(run.state, fed, *setup.arrays)
      history.append(stats)
    for _ in range(singles):
      run.state, stats = setup.update(run.state, fed, *setup.arrays)
      history.append(jax.tree.map(lambda x: x[None], stats))
  return {k: np.concatenate([parallel.local_value(h[k]) for h in history])
          for k in history[0]}


def chunk_end(step: int, steps_per_epoch: int, chunk: int) -> int:
  """The first end of a whole chunk (counted from the epoch's start) at or after `step`.

  An epoch's end counts as one (its last stretch may be shorter than a chunk).
  """
  start = step // steps_per_epoch * steps_per_epoch
  if step == start:
    return step
  return min(start + -(-(step - start) // chunk) * chunk, start + steps_per_epoch)


def next_boundary(done: int, run: Run, stop_at_step: int | None) -> int:
  """The next step at which the host must look: epoch end, stop, end, and log.

  Compiled chunks report every step's statistics, so their log lines are
  written afterwards and only epochs (and stops, at the end of a chunk)
  end a stretch; the step loop and streamed data stop at each log step too
  (the host is there anyway, and preemption is asked sooner).
  """
  spe, chunk = run.steps_per_epoch, run.setup.chunk_steps
  candidates = [(done // spe + 1) * spe, run.total_steps]
  if run.setup.run_chunk is None:
    log_every = run.config.log_every_steps
    candidates.append((done // log_every + 1) * log_every)
  if stop_at_step is not None and stop_at_step > done:
    candidates.append(stop_at_step if run.setup.run_chunk is None
                      else chunk_end(stop_at_step, spe, chunk))
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


def log_stretch(run: Run, first: int, stats: dict, epoch_end: bool) -> None:
  """train_metrics.jsonl records of a stretch of steps, and one progress line.

  A record for every log step of steps first+1 .. first+n (and for the
  stretch's last step at an epoch's end), each from that step's statistics.
  Statistics of K runs in one program (population.py) have a member axis:
  the console shows their mean, the record keeps one value per member.

  Args:
    run: the Run.
    first: the step the stretch started from.
    stats: per-step statistics [n, ...] (`advance`).
    epoch_end: the stretch ends an epoch (or the run).
  """
  last = first + len(stats["loss"])
  logged = [s for s in range(first + 1, last + 1) if s % run.config.log_every_steps == 0]
  if epoch_end and last not in logged:
    logged.append(last)
  if not logged:
    return
  final = {k: float(np.mean(v[logged[-1] - first - 1])) for k, v in stats.items()}
  speed = run.console.progress(logged[-1], (logged[-1] - 1) // run.steps_per_epoch + 1,
                               final)["images_per_second"]
  for step in logged:
    row = {k: np.asarray(v[step - first - 1]) for k, v in stats.items()}
    record = {"step": step, "epoch": step / run.steps_per_epoch,
              **{k: v.tolist() if v.ndim else float(v) for k, v in row.items()},
              "images_per_second": speed, "elapsed_s": time.time() - run.wall_start}
    run.train_log.append(record)
    run.writer.write_scalars(step, {**{k: float(np.mean(v)) for k, v in row.items()},
                                    "epoch": record["epoch"], "images_per_second": speed})


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
    stats = advance(run, done, target - done)
    check_finite(stats, done, run.last_checkpoint)
    epoch_end = target % spe == 0 or target == run.total_steps
    log_stretch(run, done, stats, epoch_end)
    done = target
    if epoch_end:
      epoch = -(-done // spe)
      if epoch % config.eval_every_epochs == 0 or done == run.total_steps:
        evaluate_fn(run, epoch, done)
      if epoch % config.checkpoint_every_epochs == 0 or done == run.total_steps:
        save_checkpoint(run, done)
    preempted = watcher.reached(boundary)  # Asked at every boundary, on every host.
    stopping = stop_at_step is not None and run.start_step < stop_at_step <= done
    reason = "stop_at_step" if stopping else "preempted" if preempted else None
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
  summary = summarize(run, time.time() - run.wall_start)
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
