"""Entry point of a grid: `python -m lt_calib.grid --config=GRID.py[:variant] --workdir=DIR`.

Trains every (mix, loss, seed) cell of the grid config and writes the
comparison table (lt_calib/experiments/grid.py says how, and what a grid
config holds). `--workers=K` runs K training processes on this machine, each
taking the next free cell (lt_calib/workers.py), then writes the table.
"""

import os
import shutil
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from lt_calib import cli, compilation, workers
from lt_calib.experiments import grid

FLAGS = flags.FLAGS


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
  grid_config = FLAGS.config
  with grid_config.unlocked():
    grid_config.train = False  # Every cell is done: the table of all of them.
  grid.run_grid(grid_config, FLAGS.workdir)


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
  grid.run_grid(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
