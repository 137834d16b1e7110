"""Grid runner: trains every (mix, loss, seed) cell and writes the comparison.

  python -m lt_calib.grid --config=configs/grids/table4.py[:smoke|:cpu] --workdir=DIR

A grid config holds `base` (a full experiment config), `mixes` and `losses`
(names of MIX_PRESETS / LOSS_PRESETS below), `seeds`, and `baseline` (the
(mix, loss) row the last delta column is measured from). Each cell trains in
this process with `train.train_and_evaluate` in DIR/<mix>__<loss>__seed<k>;
a cell whose summary.json is there is skipped, a cell with only checkpoints
resumes, so an interrupted grid is finished by running the same command
again. DIR/table.md and DIR/table.csv then give, per (mix, loss), the mean
and sample std over seeds of the final-epoch top-1, many/medium/few-shot
accuracy, ECE and NLL, grouped by loss in the layout of the paper's Table 4,
and of the best-epoch top-1 (the highest test top-1 over the run's
evaluations: selected on the test set, as the official code reports it).

Optional grid fields:
- `mix_presets` / `loss_presets`: more named presets beside the built-in
  ones, each a tuple of (dotted field, value) pairs, e.g.
  `{'tau_counts': (('mix.name', 'unimix'), ('mix.tau_units', 'counts'))}`
  (ConfigDict field names cannot hold dots, so the fields are values).
- `pairs`: the (mix, loss) pairs to run, when not every mix needs every loss;
  rows keep the order of `losses` then `mixes`.
- `seeds_in_one_program`: True trains the seeds of each (mix, loss) row as K
  runs of one program (`jax.vmap`, lt_calib/population.py), each ending in its
  own cell folder as if trained alone. False (default): measured slower than
  separate runs for ResNet-32 on a CPU and on an H100 (docs/benchmarks.md);
  several grid processes sharing a GPU fill it better.
- `train`: False writes the tables from the finished cells and trains nothing
  (a cell without a finished summary is left out; `seeds` counts the rest).

Several processes may run the same grid and workdir at once (to fill a GPU
that one small model leaves idle): each cell is trained by whichever process
first takes its lock (an flock on DIR/<cell>/.lock, released when the process
ends, even when killed); the others leave it out of their tables. A last run
with `train=False` (or any run after all have finished) writes the full table.
`--workers=K` does all of that: it starts K such processes on this machine,
each on its own CPU cores with 1/K of the GPU's memory and, where
nvidia-cuda-mps-control exists, under one NVIDIA MPS daemon of its own
(lt_calib/workers.py; `--plan_only` prints the plan), then writes the table.
"""

import contextlib
import fcntl
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable, Dict, NamedTuple

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from lt_calib import (cli, compilation, mixing, population, reporting, run_record, storage,
                      train, workers)
from lt_calib.errors import ConfigError, WorkdirError

FLAGS = flags.FLAGS

# Loss names of a grid -> config overrides. The one place where a name such
# as 'ldam_drw' is defined; anything not set here comes from `base`.
LOSS_PRESETS: Dict[str, Dict[str, Any]] = {
    "ce": {"loss.name": "ce"},
    "bayias": {"loss.name": "bayias"},
    "logit_adjusted": {"loss.name": "logit_adjusted"},
    "focal": {"loss.name": "focal"},
    "cb_ce": {"loss.name": "class_balanced", "loss.base": "ce"},
    "cb_focal": {"loss.name": "class_balanced", "loss.base": "focal"},
    "cdt": {"loss.name": "cdt"},
    "ldam": {"loss.name": "ldam", "model.head": "normalized"},
    # DRW from `base.loss.drw_epoch` (160 of 200 in the paper protocol; the
    # reduced grids move it with their schedule).
    "ldam_drw": {"loss.name": "ldam", "loss.schedule": "drw", "model.head": "normalized"},
    "ce_drw": {"loss.name": "ce", "loss.schedule": "drw"},
}

# Mix names -> overrides: every mixing method, and the two re-samplers (no
# mixing, class-level main batch).
MIX_PRESETS: Dict[str, Dict[str, Any]] = {
    **{name: {"mix.name": name} for name in mixing.MIX_METHODS},
    "cb_resample": {"mix.name": "none", "sampler.name": "class_balanced"},
    "sqrt_resample": {"mix.name": "none", "sampler.name": "square_root"},
}


# (summary key, column title, factor to the unit shown).
METRICS = (("top1", "Top-1 (%)", 100.0), ("many_acc", "Many (%)", 100.0),
           ("medium_acc", "Medium (%)", 100.0), ("few_acc", "Few (%)", 100.0),
           ("ece", "ECE (%)", 100.0), ("nll", "NLL", 1.0),
           # Highest test top-1 over the evaluations (every eval_every_epochs):
           # model selection on the test set, what the official code reports.
           ("best_top1", "Best-epoch top-1 (%, test-set selection)", 100.0))


class Cell(NamedTuple):
  mix: str
  loss: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.mix}__{self.loss}__seed{self.seed}"


def _has_field(config, dotted: str) -> bool:
  node = config
  for name in dotted.split("."):
    if not hasattr(node, "keys") or name not in node:
      return False
    node = node[name]
  return True


def _grid_presets(grid, field: str, builtin: Dict[str, Dict[str, Any]]) -> dict:
  """The built-in presets plus the grid's own `field` (mix_presets/loss_presets).

  Raises:
    ConfigError: a grid preset that is not (dotted field, value) pairs, names
      a field `grid.base` lacks, or shadows a built-in preset.
  """
  presets = dict(builtin)
  for name, pairs in (grid.get(field) or {}).items():
    if name in builtin:
      raise ConfigError(f"grid.{field}.{name} shadows the built-in preset {name!r}; "
                        "give it another name.")
    overrides = {}
    for pair in pairs:
      if (not isinstance(pair, (tuple, list)) or len(pair) != 2
          or not isinstance(pair[0], str)):
        raise ConfigError(f"grid.{field}.{name} must be (dotted field, value) pairs, "
                          f"got {pair!r}; e.g. (('mix.tau_units', 'counts'),).")
      if not _has_field(grid.base, pair[0]):
        raise ConfigError(f"grid.{field}.{name} sets {pair[0]!r}, which grid.base "
                          "does not have; fix the field's name.")
      overrides[pair[0]] = pair[1]
    presets[name] = overrides
  return presets


def grid_pairs(grid) -> list:
  """The (mix, loss) rows of the grid in table order (by loss, as Table 4).

  Raises:
    ConfigError: `grid.pairs` names a mix or loss missing from `grid.mixes` /
      `grid.losses`.
  """
  rows = [(m, l) for l in grid.losses for m in grid.mixes]
  if grid.get("pairs") is None:
    return rows
  wanted = [tuple(pair) for pair in grid.pairs]
  stray = [pair for pair in wanted if pair not in rows]
  if stray:
    raise ConfigError(f"grid.pairs has {stray}, not in grid.mixes x grid.losses; add "
                      "the mix/loss there or drop the pair.")
  return [row for row in rows if row in wanted]


def grid_cells(grid) -> list:
  """Every (mix, loss, seed) of the grid, in table order; checks the names."""
  for kind, names, presets in (
      ("mixes", grid.mixes, _grid_presets(grid, "mix_presets", MIX_PRESETS)),
      ("losses", grid.losses, _grid_presets(grid, "loss_presets", LOSS_PRESETS))):
    unknown = [n for n in names if n not in presets]
    if unknown:
      raise ConfigError(f"grid.{kind} has unknown names {unknown}; allowed: "
                        f"{sorted(presets)}.")
  return [Cell(m, l, int(s)) for m, l in grid_pairs(grid) for s in grid.seeds]


def _set_field(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise KeyError(f"config has no field {dotted!r}.")
  node[leaf] = value


def cell_config(grid, cell: Cell):
  """`grid.base` with the cell's mix, loss and seed applied (a new config)."""
  config = grid.base.copy_and_resolve_references()
  overrides = {**_grid_presets(grid, "mix_presets", MIX_PRESETS)[cell.mix],
               **_grid_presets(grid, "loss_presets", LOSS_PRESETS)[cell.loss],
               "seed": cell.seed}
  for dotted, value in overrides.items():
    _set_field(config, dotted, value)
  return config


def is_finished(cell_dir: pathlib.Path, config) -> bool:
  """True if `cell_dir` holds a finished run of `config`.

  Raises:
    WorkdirError: the folder holds (part of) a run of another config, which
      resuming would silently mix with this one.
  """
  for name in ("summary.json", "config.json"):
    path = cell_dir / name
    if path.exists():
      saved = json.loads(path.read_text())
      diff = sorted(run_record.config_differences(
          saved["config"] if name == "summary.json" else saved, config))
      if diff:
        raise WorkdirError(f"{path} is from another config (fields {diff[:8]} differ); "
                           "use a new --workdir or remove that cell's folder.")
  summary_path = cell_dir / "summary.json"
  if not summary_path.exists():
    return False
  summary = json.loads(summary_path.read_text())
  return summary["steps"] == config.num_epochs * (summary["num_train_images"]
                                                  // config.batch_size)


def _mean_std(values: list) -> tuple:
  """(mean, sample std) of the non-None values; std None below two values."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def aggregate(grid, finals: Dict[tuple, list]) -> list:
  """One row per (mix, loss): mean/std of each metric and the top-1 deltas.

  Args:
    grid: grid config (mixes, losses, pairs, baseline).
    finals: (mix, loss) -> list of `summary['final']` dicts, one per seed,
      with 'best_top1' added (the best-epoch top-1; None if unknown).

  Returns:
    list of dicts, in table order (grouped by loss as in Table 4): 'mix',
    'loss', 'seeds', '<metric>_mean' / '<metric>_std' in the shown unit,
    'delta_same_loss' (vs the 'none' row of the same loss, Table 4's delta)
    and 'delta_baseline' (vs `grid.baseline`); None where undefined.
  """
  rows = []
  for mix, loss in grid_pairs(grid):
    runs = finals.get((mix, loss), [])
    row = {"mix": mix, "loss": loss, "seeds": len(runs)}
    for key, _, unit in METRICS:
      mean, std = _mean_std([None if r.get(key) is None else unit * r[key] for r in runs])
      row[f"{key}_mean"], row[f"{key}_std"] = mean, std
    rows.append(row)
  top1 = {(r["mix"], r["loss"]): r["top1_mean"] for r in rows}
  baseline = tuple(grid.baseline)

  def delta(row, reference):
    if (row["mix"], row["loss"]) == reference:
      return None
    mine, theirs = row["top1_mean"], top1.get(reference)
    return None if mine is None or theirs is None else mine - theirs

  for row in rows:
    row["delta_same_loss"] = delta(row, ("none", row["loss"]))
    row["delta_baseline"] = delta(row, baseline)
  return rows


def _number(value, digits=2, signed=False) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell_text(mean, std, digits) -> str:
  if mean is None:
    return "-"
  return _number(mean, digits) if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_markdown(grid, rows: list) -> str:
  """The comparison as a Markdown table, with what it measures above it."""
  base = grid.base
  baseline = " + ".join(grid.baseline)
  lines = [
      f"# {grid.get('title', 'Grid')}",
      "",
      f"{base.dataset.name}-LT, rho = {base.dataset.imbalance_ratio:g}; "
      f"ResNet-{base.model.depth} (width {base.model.width}), "
      f"{base.num_epochs} epoch{'s' if base.num_epochs != 1 else ''}, batch "
      f"{base.batch_size}; seeds {list(grid.seeds)}.",
      "Final-epoch test metrics, mean ± sample std over the seeds that finished "
      "(no std with one seed). Δ: top-1 minus the `none` row of the same loss "
      f"(the paper's Table 4); Δ {baseline}: minus that row. Few is '-' when no "
      "class has fewer than 20 training images (e.g. CIFAR-10-LT at rho = 100). "
      "Best-epoch top-1: the highest test top-1 over evaluations every "
      f"{base.eval_every_epochs} epoch(s), i.e. selected on the test set as the "
      "official code reports it; not an unbiased estimate.",
      "",
      "| Mix | Loss | " + " | ".join(
          [METRICS[0][1], "Δ", f"Δ {baseline}"] + [t for _, t, _ in METRICS[1:]])
      + " | Seeds |",
      "|" + "---|" * (len(METRICS) + 5),
  ]
  for row in rows:
    cells = [row["mix"], row["loss"], _cell_text(row["top1_mean"], row["top1_std"], 2),
             _number(row["delta_same_loss"], signed=True),
             _number(row["delta_baseline"], signed=True)]
    for key, _, _ in METRICS[1:]:
      digits = 3 if key == "nll" else 2
      cells.append(_cell_text(row[f"{key}_mean"], row[f"{key}_std"], digits))
    cells.append(str(row["seeds"]))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def table_csv(rows: list) -> str:
  """The rows as CSV; accuracies and ECE in %, NLL in nats; empty = undefined."""
  columns = ["mix", "loss", "seeds", "top1_mean", "top1_std", "delta_same_loss",
             "delta_baseline"]
  for key, _, _ in METRICS[1:]:
    columns += [f"{key}_mean", f"{key}_std"]
  lines = [",".join(columns)]
  for row in rows:
    values = []
    for column in columns:
      value = row[column]
      values.append("" if value is None else
                    f"{value:.6g}" if isinstance(value, float) else str(value))
    lines.append(",".join(values))
  return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _cell_lock(cell_dir: pathlib.Path):
  """Yields True while this process holds the cell's lock, False if another does.

  An flock (not a marker file) so that a killed process never leaves a stale
  lock behind.
  """
  cell_dir.mkdir(parents=True, exist_ok=True)
  with open(cell_dir / ".lock", "a") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def best_top1(cell_dir: pathlib.Path, summary: dict) -> float | None:
  """Highest test top-1 of a finished cell over all its evaluations.

  Read from metrics.jsonl where there is one, since a resumed run's summary
  only knows the evaluations made after the restart.
  """
  values = [(summary.get("best_epoch_top1") or {}).get("top1")]
  path = cell_dir / "metrics.jsonl"
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        values.append(json.loads(line).get("top1"))
  values = [v for v in values if v is not None]
  return max(values) if values else None


def say(message: str, *args) -> None:
  """A grid progress line on stdout (library INFO logs stay hidden)."""
  print(message % args if args else message, flush=True)


def seeds_in_one_program(grid) -> bool:
  """`grid.seeds_in_one_program` (default False; see the module docstring).

  Vmapped ResNet convolutions (one weight set per member) ran slower than K
  separate runs wherever measured: ~2.4x on XLA:CPU, and on an H100 three
  3-seed programs together trained ~13,000 images/s against ~23,000 for one
  plain run alone (docs/benchmarks.md).
  """
  return bool(grid.get("seeds_in_one_program", False))


def train_seed_groups(grid, workdir: pathlib.Path, cells: list) -> bool:
  """Trains the unfinished seeds of each (mix, loss) row as one program.

  Each member's outputs land in its own cell folder (population.py), so the
  per-cell pass that follows finds them finished. Rows with one unfinished
  seed are left to that pass. Cells another process holds are left out.

  Returns:
    True if SIGTERM stopped a group (the grid stops too).
  """
  rows = {}
  for cell in cells:
    rows.setdefault((cell.mix, cell.loss), []).append(cell)
  for (mix, loss), row in rows.items():
    with contextlib.ExitStack() as stack:
      todo = [c for c in row if stack.enter_context(_cell_lock(workdir / c.name))
              and not is_finished(workdir / c.name, cell_config(grid, c))]
      if len(todo) < 2:
        continue
      say("row %s + %s: seeds %s in one program", mix, loss,
                   [c.seed for c in todo])
      try:
        results = population.train_population(
            [cell_config(grid, c) for c in todo], [str(workdir / c.name) for c in todo],
            str(workdir / (f"{mix}__{loss}__seeds_" + "_".join(str(c.seed) for c in todo))))
      finally:
        jax.clear_caches()
      if "stopped_at_step" in results[0]:
        say("row %s + %s stopped at step %d; rerun the same command to "
                        "resume", mix, loss, results[0]["stopped_at_step"])
        return True
  return False


def run_grid(grid, workdir: str, train_fn: Callable | None = None) -> list:
  """Trains the unfinished cells, then writes table.md and table.csv.

  Args:
    grid: grid config.
    workdir: the grid's folder.
    train_fn: (config, cell_workdir) -> summary, or {'stopped_at_step': k,
      ...} when SIGTERM stopped it (the grid then stops as well);
      `train.train_and_evaluate` by default (tests pass a stand-in).

  Returns:
    The aggregated rows (see `aggregate`).

  Raises:
    RuntimeError: after writing the tables, if some cell's loss became
      non-finite (that cell is left out of the table).
  """
  # Seed groups train through the library itself, never through a stand-in.
  library_training = train_fn is None
  train_fn = train_fn or train.train_and_evaluate
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cells = grid_cells(grid)
  finals, failed, missing = {}, [], []
  training = grid.get("train", True)
  if training and library_training and seeds_in_one_program(grid):
    training = not train_seed_groups(grid, workdir, cells)
  for number, cell in enumerate(cells, 1):
    config, cell_dir = cell_config(grid, cell), workdir / cell.name
    if not training:
      if not is_finished(cell_dir, config):
        missing.append(cell.name)
        continue
    else:
      with _cell_lock(cell_dir) as locked:
        if not locked:
          say("cell %d/%d %s: another process trains it; left out here",
                       number, len(cells), cell.name)
          missing.append(cell.name)
          continue
        if is_finished(cell_dir, config):
          say("cell %d/%d %s: finished before, skipped", number, len(cells),
                       cell.name)
        else:
          say("cell %d/%d %s: training", number, len(cells), cell.name)
          start = time.time()
          try:
            result = train_fn(config, str(cell_dir))
          except train.NonFiniteLossError as e:
            say("cell %s failed: %s", cell.name, e)
            failed.append(cell.name)
            continue
          finally:
            jax.clear_caches()  # Compiled steps of finished cells are not reused.
          if isinstance(result, dict) and "stopped_at_step" in result:
            # SIGTERM (a time budget, a preemption): the cell checkpointed; stop
            # the grid too, with the tables of what is finished.
            say("cell %s stopped at step %d (%s); the grid stops here, "
                            "rerun the same command to resume", cell.name,
                            result["stopped_at_step"], result.get("reason"))
            missing.extend(c.name for c in cells[number - 1:])
            break
          say("cell %s done in %.0f s", cell.name, time.time() - start)
    summary = json.loads((cell_dir / "summary.json").read_text())
    finals.setdefault((cell.mix, cell.loss), []).append(
        {**summary["final"], "best_top1": best_top1(cell_dir, summary)})
  rows = aggregate(grid, finals)
  storage.write_text(workdir / "table.md", table_markdown(grid, rows))
  storage.write_text(workdir / "table.csv", table_csv(rows))
  storage.write_text(workdir / "grid.json", json.dumps({
      "grid": json.loads(grid.to_json_best_effort()), "failed_cells": failed,
      "missing_cells": missing}, indent=2, sort_keys=True) + "\n")
  if missing:
    say("left out of the tables (not finished, or trained elsewhere): %s",
                 missing)
  say("wrote %s and table.csv", workdir / "table.md")
  if failed:
    raise RuntimeError(f"cells {failed} stopped on a non-finite loss; the tables "
                       "leave them out.")
  return rows


def define_flags():
  """Defines the CLI flags; called only when run as a program (as evaluate.py)."""
  flags.DEFINE_string("workdir", None, "Grid folder; finished cells there are skipped.")
  config_flags.DEFINE_config_file("config", None, "Grid config file[:variant].",
                                  lock_config=True)
  flags.DEFINE_integer("workers", 1, "Training processes sharing this machine's "
                       "accelerator (lt_calib/workers.py: own CPU cores, a share of the "
                       "GPU memory, NVIDIA MPS where available); each takes the next "
                       "free cell.")
  flags.DEFINE_bool("plan_only", False, "With --workers: print what each worker gets "
                    "and exit.")
  flags.mark_flags_as_required(["config", "workdir"])


def run_workers(argv: list, num_workers: int, plan_only: bool) -> None:
  """Runs this grid command as `num_workers` worker processes, then writes the table."""
  command = [sys.executable, "-m", "lt_calib.grid", *[
      a for a in argv[1:] if not a.startswith(("--workers", "--plan_only"))]]
  if plan_only:
    launch = workers.plan(num_workers, sorted(os.sched_getaffinity(0)),
                          shutil.which(workers.MPS_CONTROL), "<temporary folder>")
    for line in workers.describe(launch):
      print(line)
    print("command:", " ".join(command))
    return
  codes = workers.run(command, num_workers)
  if any(codes):
    raise RuntimeError(f"grid workers ended with exit codes {codes}.")
  grid = FLAGS.config
  with grid.unlocked():
    grid.train = False  # Every cell is done: the table of all of them.
  run_grid(grid, FLAGS.workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  if FLAGS.workers > 1 or FLAGS.plan_only:
    run_workers(sys.argv, FLAGS.workers, FLAGS.plan_only)
    return
  # Cells that differ only in the seed compile to the same programs; the
  # persistent cache lets every seed after the first skip compilation.
  compilation.enable_persistent_cache()
  run_grid(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
