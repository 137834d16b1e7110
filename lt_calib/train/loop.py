"""The training loop: stretches of steps between the points where the host looks in.

The host looks in at each epoch's end (evaluation, checkpoint), at a stop
(--stop_at_step, preemption) and, where it drives every step anyway (the step
loop, streamed data), at each log step. At every such boundary every process
asks JAX's preemption service whether to stop, with a counter that grows by
one per boundary on every host, so all stop at the same one.
"""

import dataclasses
import itertools
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lt_calib import checkpointing, evaluation, parallel, reporting
from lt_calib.errors import UserError
from lt_calib.train.setup import Setup


class NonFiniteLossError(UserError, FloatingPointError):
  """The training loss became NaN or infinite."""


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
  evaluations: list = dataclasses.field(default_factory=list)
  final_logits: np.ndarray | None = None  # [M, C] of the latest evaluation that kept them.

  @property
  def steps_per_epoch(self) -> int:
    return self.setup.step_cfg.steps_per_epoch


def train_stretch(run: Run, done: int, num_steps: int) -> dict:
  """Trains `num_steps` steps from step `done`; returns the per-step statistics [n, ...].

  Where the feed keeps the data on the devices, the stretch runs as whole
  compiled chunks, then single steps for what remains of the epoch (when the
  chunk does not divide it); every stretch starts at an epoch's start or a
  chunk's end (`next_boundary`), so each step runs in the same program
  however the run was cut, and a resumed run computes the same bits.
  """
  setup, history, step, end = run.setup, [], done, done + num_steps
  while step < end:  # Dispatches run ahead; nothing blocks until the end.
    fed = setup.feed.fed(step, setup.run_keys)
    if setup.run_chunk is not None and end - step >= setup.chunk_steps:
      run.state, stats = setup.run_chunk(run.state, fed, *setup.arrays)
      step += setup.chunk_steps
    else:
      run.state, stats = setup.update(run.state, fed, *setup.arrays)
      stats = jax.tree.map(lambda x: x[None], stats)
      step += 1
    history.append(stats)
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


def save_checkpoint(run: Run, step: int, force: bool = True) -> None:
  """Saves at `step` unless done; without `force`, Orbax's interval decides."""
  if run.last_checkpoint != step and checkpointing.save(run.manager, step, run.state,
                                                        force=force):
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
    stats = train_stretch(run, done, target - done)
    check_finite(stats, done, run.last_checkpoint)
    epoch_end = target % spe == 0 or target == run.total_steps
    log_stretch(run, done, stats, epoch_end)
    done = target
    if epoch_end:
      epoch = -(-done // spe)
      if epoch % config.eval_every_epochs == 0 or done == run.total_steps:
        evaluate_fn(run, epoch, done)
      save_checkpoint(run, done, force=done == run.total_steps)
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
