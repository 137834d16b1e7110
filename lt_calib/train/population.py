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
equal those of `trainer.train_and_evaluate` on the same config to float
tolerance (vmap may order reductions differently). The stacked state is
checkpointed in the group's workdir, so an interrupted group resumes.
"""

import dataclasses
import time

import jax
import numpy as np

from lt_calib import (checkpointing, config_checks, distributed, evaluation, parallel,
                      reporting, run_identity)
from lt_calib import data as data_lib
from lt_calib.calibration import report
from lt_calib.errors import ConfigError
from lt_calib.train import loop, trainer
from lt_calib.train import setup as setup_lib
from lt_calib.train import step as step_lib

# Fields in which the members of one program may differ.
MEMBER_FIELDS = ("seed", "mix.alpha", "mix.tau")


def member_differences(configs) -> set:
  """Dotted fields (bookkeeping aside) in which the configs differ."""
  flat = [run_identity.flatten(run_identity.config_dict(c)) for c in configs]
  keys = set().union(*flat)
  return {k for k in keys if k not in run_identity.BOOKKEEPING_FIELDS
          and len({repr(f.get(k)) for f in flat}) > 1}


def can_share_program(configs) -> bool:
  """True if the configs differ only in MEMBER_FIELDS."""
  return member_differences(configs) <= set(MEMBER_FIELDS)


def member(tree, k: int):
  """Member k of a stacked pytree."""
  return jax.tree.map(lambda leaf: leaf[k], tree)


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

  def evaluate(run: loop.Run, epoch: int, step: int, log: bool = True):
    result = loop.evaluate_test_set(run, keep_logits=True)
    run.final_logits = evaluation.split_logits(result)  # [K, M, C]
    if not log:  # Resumed after the last evaluation: the logits for the reports.
      return
    for k, member_logits in enumerate(run.final_logits):
      record = evaluation.summarize(evaluation.member(result.statistics, k),
                                    run.dataset.prior.counts, member_logits,
                                    run.dataset.test_labels, run.config.calibration_bins)
      record.update(epoch=epoch, step=step)
      members.evaluations[k].append(record)
      members.eval_logs[k].append(record)
    tops = [100 * m[-1]["top1"] for m in members.evaluations]
    run.console.line(f"eval epoch {epoch}: top-1 {np.mean(tops):.2f} % mean of "
                     f"{len(tops)} runs ({min(tops):.2f}-{max(tops):.2f})")

  return evaluate


def _check(configs) -> None:
  for config in configs:
    config_checks.check_config(config, jax.device_count())
  if not can_share_program(configs):
    raise ConfigError(
        f"runs of one program may differ only in {MEMBER_FIELDS}; these differ in "
        f"{sorted(member_differences(configs))}.")


def _prepare(configs, workdirs, group_workdir, allow_config_change):
  """Checks, data, per-member and group records, build, restore."""
  _check(configs)
  group_workdir = run_identity.open_workdir(group_workdir)
  workdirs = [run_identity.open_workdir(w) for w in workdirs]
  dataset = data_lib.load(configs[0].dataset)
  identity = run_identity.data_identity(dataset)
  changes = [run_identity.check(w, c, identity, allow_config_change)
             for w, c in zip(workdirs, configs)]
  mesh = parallel.make_mesh()
  manager = checkpointing.make_manager(
      group_workdir, configs[0].keep_checkpoints,
      save_interval_steps=configs[0].checkpoint_every_epochs
      * step_lib.epoch_steps(configs[0], dataset))
  latest = manager.latest_step()
  setup = setup_lib.build_for(configs, dataset, mesh, start_step=latest or 0)
  state = setup.state if latest is None else checkpointing.restore(manager, latest,
                                                                   setup.state)
  start_step = int(parallel.local_value(state.step)[0])
  is_main = distributed.is_main_process()
  records = [run_identity.write(w, c, identity, change, start_step) if is_main else {}
             for w, c, change in zip(workdirs, configs, changes)]
  total = configs[0].num_epochs * setup.step_cfg.steps_per_epoch
  run = loop.Run(
      config=configs[0], workdir=group_workdir, dataset=dataset, setup=setup, mesh=mesh,
      manager=manager, writer=reporting.create_writer(str(group_workdir), False),
      console=reporting.Console(is_main, total, start_step,
                                len(configs) * configs[0].batch_size),
      train_log=reporting.JsonLines(group_workdir / "train_metrics.jsonl", start_step,
                                    is_main),
      eval_log=reporting.JsonLines(group_workdir / "metrics.jsonl", start_step, False),
      state=state, start_step=start_step, total_steps=total, last_checkpoint=latest,
      record=records[0])
  eval_logs = [reporting.JsonLines(w / "metrics.jsonl", start_step, is_main)
               for w in workdirs]
  members = Members(configs, workdirs, eval_logs,
                    [reporting.JsonLines(w / "train_metrics.jsonl", start_step, is_main)
                     for w in workdirs], [list(log.records) for log in eval_logs])
  return run, members


def _member_train_logs(run: loop.Run, members: Members) -> None:
  """Splits the group's train_metrics.jsonl into each member's own file."""
  for record in run.train_log.records[len(members.train_logs[0].records):]:
    for k, log in enumerate(members.train_logs):
      log.append({key: (value[k] if isinstance(value, list) else value)
                  for key, value in record.items()})


def _finish_member(run: loop.Run, members: Members, k: int, wall: float) -> dict:
  """Member k's checkpoint, summary.json and report, as its own run writes them."""
  config, workdir, evaluations = members.configs[k], members.workdirs[k], members.evaluations[k]
  state_k = member(run.state, k)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  checkpointing.save(manager, run.total_steps, state_k, {"group": str(run.workdir)})
  manager.wait_until_finished()
  manager.close()
  summary = trainer.summary_record(config, run, evaluations, state_k, wall)
  summary["trained_in_group"] = {"workdir": str(run.workdir), "member": k,
                                 "members": len(members.configs)}
  if distributed.is_main_process():
    reporting.write_json(workdir / "summary.json", summary)
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
    allow_config_change: as for `trainer.train_and_evaluate`.
    stop_at_step: checkpoint the group and return at this step.

  Returns:
    The K summary dicts, or K {'stopped_at_step', 'reason'} dicts.
  """
  wall_start = time.time()
  run, members = _prepare(configs, workdirs, group_workdir, allow_config_change)
  run.console.line(f"{len(configs)} runs in one program (differing in "
                   f"{sorted(member_differences(configs)) or 'nothing'}); group "
                   f"workdir {run.workdir}")
  trainer.describe(run)
  watcher = checkpointing.PreemptionWatcher()
  evaluate = make_evaluate(members)
  try:
    outcome = loop.train_loop(run, stop_at_step, watcher, evaluate_fn=evaluate)
  finally:
    watcher.close()
    run.console.close()
    run.manager.wait_until_finished()
    _member_train_logs(run, members)
  if outcome != "finished":
    run.manager.close()
    step = int(parallel.local_value(run.state.step)[0])
    return [{"stopped_at_step": step, "reason": outcome} for _ in configs]
  if run.final_logits is None:
    last_logged = members.evaluations[0] and members.evaluations[0][-1]["step"] == run.total_steps
    evaluate(run, -(-run.total_steps // run.steps_per_epoch), run.total_steps,
             log=not last_logged)
  summaries = [_finish_member(run, members, k, time.time() - wall_start)
               for k in range(len(configs))]
  run.manager.close()
  return summaries
