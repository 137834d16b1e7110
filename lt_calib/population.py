"""K runs of one config in one program: `jax.vmap` over states and run keys.

Runs that differ only in their seed (and, optionally, `mix.alpha` or
`mix.tau`) compute the same program on different numbers, so K of them can
share every dispatch: the train state, the run keys and the per-run fields of
the StepConfig get a leading axis of size K, the in-memory training set is
shared. On an accelerator that one run leaves idle (a ResNet-32 at batch 128)
this multiplies throughput; on a CPU it changes little.

Each member k ends with exactly the outputs of its own run in its own
workdir: checkpoint (with fingerprint), config.json, run.json,
metrics.jsonl, train_metrics.jsonl, summary.json, report.md. Its numbers
equal those of `train.train_and_evaluate` on the same config to float
tolerance (vmap may order reductions differently). The stacked state is
checkpointed in the group's workdir, so an interrupted group resumes.
"""

import dataclasses
import functools
import time

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from lt_calib import (checkpointing, config_checks, distributed, evaluation, losses, models,
                      parallel, reporting, run_record, steps, train)
from lt_calib import data as data_lib
from lt_calib.calibration import metrics, report
from lt_calib.errors import ConfigError

# Fields in which the members of one program may differ.
MEMBER_FIELDS = ("seed", "mix.alpha", "mix.tau")


def member_differences(configs) -> set:
  """Dotted fields (bookkeeping aside) in which the configs differ."""
  flat = [run_record.flatten(run_record.config_dict(c)) for c in configs]
  keys = set().union(*flat)
  return {k for k in keys if k not in run_record.BOOKKEEPING_FIELDS
          and len({repr(f.get(k)) for f in flat}) > 1}


def can_share_program(configs) -> bool:
  """True if the configs differ only in MEMBER_FIELDS (and need in-memory data)."""
  return member_differences(configs) <= set(MEMBER_FIELDS)


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree, k: int):
  """Member k of a stacked pytree."""
  return jax.tree.map(lambda leaf: leaf[k], tree)


def build(configs, dataset, mesh) -> train.Setup:
  """`train.build` for K stacked runs of in-memory data.

  Args:
    configs: K experiment configs that `can_share_program`.
    dataset: the in-memory `sources.Dataset` they share.
    mesh: device mesh with a 'data' axis.

  Returns:
    train.Setup whose state, step config and run keys have a leading K axis.
  """
  config = configs[0]
  replicated = parallel.replicated(mesh)
  step_cfg = _stack([steps.make_step_config(c, dataset) for c in configs])
  loss_fn = losses.make_loss(config.loss, dataset.prior, step_cfg.steps_per_epoch,
                             models.logit_scale(config.model))
  tx, schedule = steps.make_optimizer(config, step_cfg.steps_per_epoch)
  model = models.create_model(config.model, dataset.info.num_classes)
  members = [train.RunKeys.from_seed(c.seed) for c in configs]
  run_keys = _stack(members)
  state = _stack([steps.create_train_state(keys.init, model, dataset.image_shape, tx)
                  for keys in members])
  one_step = jax.vmap(train.make_one_step(loss_fn, schedule, mesh, streaming=False),
                      in_axes=(0, 0, None, None, 0, 0))
  jit = functools.partial(jax.jit, donate_argnums=(0,),
                          out_shardings=(replicated, replicated))
  chunk = train.steps_per_dispatch(config, step_cfg.steps_per_epoch)
  logits_of = jax.vmap(functools.partial(steps.eval_step, mean=dataset.info.mean,
                                         std=dataset.info.std), in_axes=(0, None))
  eval_step = evaluation.make_step(logits_of, dataset.info.num_classes,
                                   config.calibration_bins, mesh, members=True)
  arrays = parallel.replicate((dataset.train_images, dataset.train_labels, step_cfg,
                               run_keys), mesh)
  return train.Setup(jit(one_step),
                     None if chunk == 1 else jit(train.chunk_runner(one_step, chunk)), chunk,
                     train.make_epoch_inputs(len(dataset.train_labels), mesh, members=True),
                     eval_step, parallel.replicate(state, mesh), arrays, step_cfg,
                     streaming=False)


@dataclasses.dataclass
class Members:
  """Per-member outputs of a group (one entry per config)."""
  configs: list
  workdirs: list
  eval_logs: list
  train_logs: list
  evaluations: list


def make_evaluate(members: Members):
  """The group's evaluation: every member's metrics into its own files."""

  def evaluate(run: train.Run, epoch: int, step: int):
    result = train.evaluate_test_set(run, keep_logits=True)
    logits = evaluation.split_logits(result)  # [K, M, C]
    for k, member_logits in enumerate(logits):
      record = evaluation.summarize(evaluation.member(result.statistics, k),
                                    run.dataset.prior.counts, member_logits,
                                    run.dataset.test_labels, run.config.calibration_bins)
      record.update(epoch=epoch, step=step)
      members.evaluations[k].append(record)
      members.eval_logs[k].append(record)
    run.final_logits = logits
    tops = [100 * m[-1]["top1"] for m in members.evaluations]
    run.console.line(f"eval epoch {epoch}: top-1 {np.mean(tops):.2f} % mean of "
                     f"{len(tops)} runs ({min(tops):.2f}-{max(tops):.2f})")

  return evaluate


def _prepare(configs, workdirs, group_workdir, allow_config_change):
  """Checks, data, per-member and group records, build, restore."""
  for config in configs:
    config_checks.check_config(config, jax.device_count())
  if not can_share_program(configs):
    raise ConfigError(
        f"runs of one program may differ only in {MEMBER_FIELDS}; these differ in "
        f"{sorted(member_differences(configs))}.")
  group_workdir = train.open_workdir(group_workdir)
  workdirs = [train.open_workdir(w) for w in workdirs]
  dataset = data_lib.load(configs[0].dataset)
  if not hasattr(dataset, "train_images"):
    raise ConfigError("runs in one program need an in-memory dataset; train streamed "
                      "datasets one run at a time.")
  identity = run_record.data_identity(dataset)
  changes = [run_record.check(w, c, identity, allow_config_change)
             for w, c in zip(workdirs, configs)]
  mesh = parallel.make_mesh()
  setup = build(configs, dataset, mesh)
  manager = checkpointing.make_manager(group_workdir, configs[0].keep_checkpoints)
  state, latest = setup.state, manager.latest_step()
  if latest is not None:
    state = checkpointing.restore(manager, latest, state)
  start_step = int(parallel.local_value(state.step)[0])
  is_main = distributed.is_main_process()
  if is_main:
    for w, c, change in zip(workdirs, configs, changes):
      run_record.write(w, c, identity, change, start_step)
  total = configs[0].num_epochs * setup.step_cfg.steps_per_epoch
  run = train.Run(
      config=configs[0], workdir=group_workdir, dataset=dataset, setup=setup, mesh=mesh,
      manager=manager, writer=reporting.create_writer(str(group_workdir), False),
      console=reporting.Console(is_main, total, start_step,
                                len(configs) * configs[0].batch_size),
      train_log=reporting.JsonLines(group_workdir / "train_metrics.jsonl", start_step,
                                    is_main),
      eval_log=reporting.JsonLines(group_workdir / "metrics.jsonl", start_step, False),
      state=state, start_step=start_step, total_steps=total, last_checkpoint=latest)
  eval_logs = [reporting.JsonLines(w / "metrics.jsonl", start_step, is_main)
               for w in workdirs]
  members = Members(configs, workdirs, eval_logs,
                    [reporting.JsonLines(w / "train_metrics.jsonl", start_step, is_main)
                     for w in workdirs], [list(log.records) for log in eval_logs])
  return run, members


def _member_train_logs(run: train.Run, members: Members) -> None:
  """Splits the group's train_metrics.jsonl into each member's own file."""
  for record in run.train_log.records[len(members.train_logs[0].records):]:
    for k, log in enumerate(members.train_logs):
      log.append({key: (value[k] if isinstance(value, list) else value)
                  for key, value in record.items()})


def _finish_member(run: train.Run, members: Members, k: int, wall: float) -> dict:
  """Member k's checkpoint, summary.json and report, as its own run writes them."""
  config, workdir, evaluations = members.configs[k], members.workdirs[k], members.evaluations[k]
  state_k = member(run.state, k)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  checkpointing.save(manager, run.total_steps, state_k, {"group": str(run.workdir)})
  manager.wait_until_finished()
  manager.close()
  best = max(evaluations, key=lambda r: r["top1"])
  summary = {
      "final": evaluations[-1],
      "best_epoch_top1": {"top1": best["top1"], "epoch": best["epoch"],
                          "step": best["step"],
                          "note": "selected on the test set; for comparison with papers "
                                  "that report it, not an unbiased estimate"},
      "train_class_counts": run.dataset.prior.counts.tolist(),
      "num_train_images": int(len(run.dataset.train_labels)),
      "num_test_images": int(len(run.dataset.test_labels)),
      "data_source": run.dataset.source, "config": run_record.config_dict(config),
      "seed": config.seed, "steps": run.total_steps,
      "steps_this_run": run.total_steps - run.start_step,
      "resumed_from_step": run.start_step or None, "wall_time_s": wall,
      "train_images_per_s": run.console.images_per_second(),
      "trained_in_group": {"workdir": str(run.workdir), "member": k,
                           "members": len(members.configs)},
      "fingerprint": checkpointing.fingerprint(state_k),
      "environment": checkpointing.environment(),
      "devices": [str(d) for d in jax.devices()], "jax_version": jax.__version__}
  if distributed.is_main_process():
    reporting.write_json(epath.Path(workdir) / "summary.json", summary)
    report.write_training_report(workdir, config, run.final_logits[k],
                                 run.dataset.test_labels, run.dataset.prior.counts,
                                 evaluations[-1])
  return summary


def train_population(configs, workdirs, group_workdir, allow_config_change: bool = False,
                     stop_at_step: int | None = None) -> list:
  """Trains K runs in one program; each ends as if trained alone.

  Args:
    configs: K configs differing only in MEMBER_FIELDS.
    workdirs: K output folders, one per config.
    group_workdir: folder of the stacked checkpoints and the group's log.
    allow_config_change: as for `train.train_and_evaluate`.
    stop_at_step: checkpoint the group and return at this step.

  Returns:
    The K summary dicts, or K {'stopped_at_step', 'reason'} dicts.
  """
  wall_start = time.time()
  run, members = _prepare(configs, workdirs, group_workdir, allow_config_change)
  run.console.line(f"{len(configs)} runs in one program (differing in "
                   f"{sorted(member_differences(configs)) or 'nothing'}); group "
                   f"workdir {run.workdir}")
  train.describe(run)
  watcher = checkpointing.PreemptionWatcher()
  try:
    outcome = train.train_loop(run, stop_at_step, watcher,
                               evaluate_fn=make_evaluate(members))
  finally:
    watcher.close()
    run.console.close()
    run.manager.wait_until_finished()
    _member_train_logs(run, members)
  if outcome != "finished":
    run.manager.close()
    step = int(parallel.local_value(run.state.step)[0])
    return [{"stopped_at_step": step, "reason": outcome} for _ in configs]
  if run.final_logits is None or members.evaluations[0][-1]["step"] != run.total_steps:
    for evaluations, log in zip(members.evaluations, members.eval_logs):
      if evaluations and evaluations[-1]["step"] == run.total_steps:
        evaluations.pop()
        log.records.pop()
    make_evaluate(members)(run, -(-run.total_steps // run.steps_per_epoch),
                           run.total_steps)
  summaries = [_finish_member(run, members, k, time.time() - wall_start)
               for k in range(len(configs))]
  run.manager.close()
  return summaries
