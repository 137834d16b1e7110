"""A second stage after a finished run: MiSLAS's classifier re-training (Table D3).

App. D.5 of the paper adds MiSLAS's second stage (Zhong et al. 2021) after
its own first stage: 10 more epochs in which the backbone is frozen and the
classifier is retrained on class-balanced batches with label-aware smoothing
(LAS), optionally re-estimating BatchNorm's statistics ("shift learning").
Here that is an ordinary run of a config with `stage2.enabled` (the
`:two_stage` variant, configs/common.py): its own workdir, checkpoints,
resume, summary and report. This module is what differs at its start:

- `first_stage_record` checks that `stage2.first_stage` holds a finished run
  of the same model and data, and returns what identifies it (workdir, final
  step, fingerprint) for run.json and summary.json;
- `restore_first_stage` puts that run's final parameters and BatchNorm
  statistics into the new state (fresh optimizer, step 0), checking the
  fingerprint;
- `check_unchanged` refuses to resume a stage 2 whose first stage has since
  been replaced.

The optimizer (train/state.py) and the step (train/step.py) do the freezing.
"""

from lt_calib import checkpointing, parallel, run_identity, storage
from lt_calib.errors import ConfigError, WorkdirError
from lt_calib.train.state import classifier_only

# What a second stage must share with its first: the network and the data it
# was trained on (fields that only say where the data is read from may differ).
SHARED_PREFIXES = ("model.", "dataset.")


def first_stage_record(config) -> dict | None:
  """The first stage of a second-stage config, checked; None for other runs.

  Args:
    config: the run's config.

  Returns:
    {'workdir', 'step', 'fingerprint', 'top1', 'ece'} of the first stage's
    final state, or None when `stage2.enabled` is off.

  Raises:
    ConfigError: no first stage given, or it trained another model or data.
    WorkdirError: the first stage's workdir holds no finished run.
  """
  if not classifier_only(config):
    return None
  where = config.stage2.first_stage.format(seed=config.seed)
  if not where:
    raise ConfigError("stage2.enabled needs the first stage's workdir: add "
                      "--config.stage2.first_stage=DIR (a finished run of this config "
                      "without ':two_stage').")
  workdir = storage.as_path(where)
  summary = run_identity.read_json(workdir / "summary.json")
  saved = run_identity.read_json(workdir / "config.json")
  if summary is None or saved is None:
    raise WorkdirError(f"stage2.first_stage={where} holds no finished run (no "
                       "summary.json); train the first stage to its end first.")
  differences = {k: v for k, v in run_identity.config_differences(saved, config).items()
                 if k.startswith(SHARED_PREFIXES)}
  if differences:
    shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in differences.items())
    raise ConfigError(f"stage 2 must keep the first stage's model and data ({shown}); "
                      "use the first stage's config and variants with ',two_stage' added.")
  final = summary["final"]
  return {"workdir": str(workdir), "step": int(summary["steps"]),
          "fingerprint": summary["fingerprint"], "top1": final["top1"],
          "ece": final["ece"]}


def in_grid(config, grid_workdir):
  """`config` with a relative `stage2.first_stage` taken as a cell of the grid.

  A grid's second-stage preset names its first stage by cell, e.g.
  'unimix__bayias__seed{seed}' (configs/grids/two_stage.py); the grid's
  folder is only known when it runs.
  """
  where = config.get("stage2", {}).get("first_stage", "")
  if classifier_only(config) and where and not storage.is_remote(where) and not (
      where.startswith("/")):
    config = config.copy_and_resolve_references()
    config.stage2.first_stage = str(storage.as_path(grid_workdir) / where)
  return config


def restore_first_stage(record: dict, state, mesh):
  """`state` with the first stage's final parameters and BatchNorm statistics.

  Args:
    record: `first_stage_record`.
    state: the second stage's initial TrainState (its optimizer state, step 0).
    mesh: the mesh; the restored arrays are replicated on it.

  Returns:
    the TrainState to train from.

  Raises:
    WorkdirError: the first stage's latest checkpoint is not the state its
      summary reports (step or fingerprint differ).
  """
  step, tree = checkpointing.read_state_tree(record["workdir"])
  if step != record["step"]:
    raise WorkdirError(f"stage2.first_stage={record['workdir']}: its latest checkpoint is "
                       f"step {step}, its summary step {record['step']}; point stage 2 at "
                       "a finished run whose final checkpoint is kept.")
  params, batch_stats = parallel.replicate((tree["params"], tree["batch_stats"]), mesh)
  state = state.replace(params=params, batch_stats=batch_stats)
  if checkpointing.fingerprint(state) != record["fingerprint"]:
    raise WorkdirError(f"stage2.first_stage={record['workdir']}: the final checkpoint's "
                       "fingerprint differs from its summary.json; the run was changed "
                       "after it finished. Retrain it or point at another run.")
  return state


def check_unchanged(workdir, record: dict | None) -> None:
  """Refuses to resume a second stage whose first stage is no longer the same run.

  Args:
    workdir: the second stage's workdir.
    record: `first_stage_record` of this invocation (None: not a second stage).

  Raises:
    WorkdirError: run.json names a first stage with another fingerprint.
  """
  saved = (run_identity.read_json(storage.as_path(workdir) / "run.json") or {}).get("first_stage")
  if record is None or saved is None or saved["fingerprint"] == record["fingerprint"]:
    return
  raise WorkdirError(f"workdir {workdir} continued another first stage (fingerprint "
                     f"{saved['fingerprint'][:12]}, now {record['fingerprint'][:12]}); "
                     "use a new --workdir for a stage 2 after the new first stage.")
