"""Wall time of a whole run of a config, from the command to its summary.json.

  python benchmarks/end_to_end.py --config=configs/cifar10_lt.py[:variant] \
      [--workdir=DIR] [--repeats=1] [--fresh_cache] [-- --config.x=y ...]

Starts `python -m lt_calib.main` in a fresh process (everything a user
waits for: imports, data, compilation, training, evaluations, report) and
splits the time with the run's own records: set-up and compilation until the
first logged step, training, and what follows the last step (final
evaluation, summary, report). Prints one JSON line per repetition.

`--fresh_cache` gives the runs an empty persistent compilation cache of
their own (lt_calib/compilation.py): the first repetition starts cold, the
next ones warm, and each line says how many programs were loaded from the
cache and how many compiled.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def time_run(config: str, workdir: pathlib.Path, overrides: list, env=None) -> dict:
  """Runs the trainer once in `workdir` (must be new) and times it."""
  command = [sys.executable, "-m", "lt_calib.main", f"--config={config}",
             f"--workdir={workdir}", *overrides]
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          env=env)
  wall = time.perf_counter() - start
  if result.returncode != 0:
    raise SystemExit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
  summary = json.loads((workdir / "summary.json").read_text())
  records = [json.loads(l) for l in (workdir / "train_metrics.jsonl").read_text().splitlines()]
  first, last = records[0], records[-1]
  return {
      "config": config, "overrides": overrides, "wall_s": wall,
      "run_wall_s": summary["wall_time_s"],
      "until_first_log_s": first["elapsed_s"],
      "train_s": last["elapsed_s"] - first["elapsed_s"],
      "after_last_step_s": summary["wall_time_s"] - last["elapsed_s"],
      "train_images_per_s": summary["train_images_per_s"], "steps": summary["steps"],
      "top1": summary["final"]["top1"], "ece": summary["final"]["ece"],
      "compilation_cache": summary.get("compilation_cache"),
      "environment": summary["environment"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", default=None, help="Parent of the run folders.")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--fresh_cache", action="store_true",
                      help="an empty compilation cache for these runs: cold, then warm")
  args, overrides = parser.parse_known_args()
  overrides = [o for o in overrides if o != "--"]
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="lt_calib_e2e_"))
  env = None
  if args.fresh_cache:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "compilation_cache")}
  for k in range(args.repeats):
    print(json.dumps(time_run(args.config, root / f"run{k}", overrides, env)), flush=True)


if __name__ == "__main__":
  main()
