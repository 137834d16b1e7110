"""Grid runner: trains every (mix, loss, seed) cell and writes the comparison.

  python -m lt_calib.grid --config=configs/grids/table4.py[:smoke|:cpu] --workdir=DIR

A grid config holds `base` (a full experiment config), `mixes` and `losses`
(names of lt_calib/experiments/presets.py's presets), `seeds`, and `baseline` (the
(mix, loss) row the last delta column is measured from). Each cell trains in
this process with `trainer.train_and_evaluate` in DIR/<mix>__<loss>__seed<k>;
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
  runs of one program (`jax.vmap`, lt_calib/train/population.py), each ending in its
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
import pathlib
import time
from typing import Callable

import jax

from lt_calib import run_identity, storage
from lt_calib.errors import WorkdirError
from lt_calib.experiments import presets, tables
from lt_calib.train import loop, population, trainer, two_stage

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
      diff = sorted(run_identity.config_differences(
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


def announce(message: str, *args) -> None:
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
              and not is_finished(workdir / c.name, presets.cell_config(grid, c))]
      if len(todo) < 2:
        continue
      announce("row %s + %s: seeds %s in one program", mix, loss,
                   [c.seed for c in todo])
      try:
        results = population.train_population(
            [presets.cell_config(grid, c) for c in todo], [str(workdir / c.name) for c in todo],
            str(workdir / (f"{mix}__{loss}__seeds_" + "_".join(str(c.seed) for c in todo))))
      finally:
        jax.clear_caches()
      if "stopped_at_step" in results[0]:
        announce("row %s + %s stopped at step %d; rerun the same command to "
                        "resume", mix, loss, results[0]["stopped_at_step"])
        return True
  return False


def write_tables(grid, workdir: pathlib.Path, finals: dict, failed: list,
                 missing: list) -> list:
  """table.md, table.csv and grid.json of the finished cells; returns the rows."""
  rows = tables.aggregate(grid, finals)
  storage.write_text(workdir / "table.md", tables.table_markdown(grid, rows))
  storage.write_text(workdir / "table.csv", tables.table_csv(rows))
  storage.write_text(workdir / "grid.json", json.dumps({
      "grid": json.loads(grid.to_json_best_effort()), "failed_cells": failed,
      "missing_cells": missing}, indent=2, sort_keys=True) + "\n")
  return rows


def run_grid(grid, workdir: str, train_fn: Callable | None = None) -> list:
  """Trains the unfinished cells, then writes table.md and table.csv.

  Args:
    grid: grid config.
    workdir: the grid's folder.
    train_fn: (config, cell_workdir) -> summary, or {'stopped_at_step': k,
      ...} when SIGTERM stopped it (the grid then stops as well);
      `trainer.train_and_evaluate` by default (tests pass a stand-in).

  Returns:
    The aggregated rows (see `tables.aggregate`).

  Raises:
    RuntimeError: after writing the tables, if some cell's loss became
      non-finite (that cell is left out of the table).
  """
  # Seed groups train through the library itself, never through a stand-in.
  library_training = train_fn is None
  train_fn = train_fn or trainer.train_and_evaluate
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cells = presets.grid_cells(grid)
  finals, failed, missing = {}, [], []
  training = grid.get("train", True)
  if training and library_training and seeds_in_one_program(grid):
    training = not train_seed_groups(grid, workdir, cells)
  for number, cell in enumerate(cells, 1):
    config = two_stage.in_grid(presets.cell_config(grid, cell), workdir)  # Stage 2: its stage 1.
    cell_dir = workdir / cell.name
    if not training:
      if not is_finished(cell_dir, config):
        missing.append(cell.name)
        continue
    else:
      with _cell_lock(cell_dir) as locked:
        if not locked:
          announce("cell %d/%d %s: another process trains it; left out here",
                       number, len(cells), cell.name)
          missing.append(cell.name)
          continue
        if is_finished(cell_dir, config):
          announce("cell %d/%d %s: finished before, skipped", number, len(cells),
                       cell.name)
        else:
          announce("cell %d/%d %s: training", number, len(cells), cell.name)
          start = time.time()
          try:
            result = train_fn(config, str(cell_dir))
          except loop.NonFiniteLossError as e:
            announce("cell %s failed: %s", cell.name, e)
            failed.append(cell.name)
            continue
          finally:
            jax.clear_caches()  # Compiled steps of finished cells are not reused.
          if isinstance(result, dict) and "stopped_at_step" in result:
            # SIGTERM (a time budget, a preemption): the cell checkpointed; stop
            # the grid too, with the tables of what is finished.
            announce("cell %s stopped at step %d (%s); the grid stops here, "
                            "rerun the same command to resume", cell.name,
                            result["stopped_at_step"], result.get("reason"))
            missing.extend(c.name for c in cells[number - 1:])
            break
          announce("cell %s done in %.0f s", cell.name, time.time() - start)
    summary = json.loads((cell_dir / "summary.json").read_text())
    finals.setdefault((cell.mix, cell.loss), []).append(
        {**summary["final"], "best_top1": tables.best_top1(cell_dir, summary)})
  rows = write_tables(grid, workdir, finals, failed, missing)
  if missing:
    announce("left out of the tables (not finished, or trained elsewhere): %s",
                 missing)
  announce("wrote %s and table.csv", workdir / "table.md")
  if failed:
    raise RuntimeError(f"cells {failed} stopped on a non-finite loss; the tables "
                       "leave them out.")
  return rows
