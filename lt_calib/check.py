"""Reproducibility checks on your own hardware.

  python -m lt_calib.check --config=FILE[:variant] [--steps=N]
      [--mode=repeat,resume|devices] [--workdir=DIR] [--config.x.y=v ...]

Each mode trains in fresh processes (`python -m lt_calib.main`, with the
same config file, variant and overrides) and compares what they produce:

- repeat: the same N steps twice. Guarantee: bit-identical on the same
  hardware, device count and software versions.
- resume: N steps straight, and N steps with a stop (checkpoint, new
  process) at step N // 2. Same guarantee.
- devices: the same N steps on the full device count and on half of it
  (CPU host devices via XLA_FLAGS, GPUs via CUDA_VISIBLE_DEVICES). Float
  reductions over other shards add in another order, so only float
  tolerance holds: the largest relative differences are reported and the
  check fails only if the first step's losses disagree beyond 1e-3.

Compared: the SHA-256 fingerprint of parameters and BatchNorm statistics
(and, where it differs, the first differing leaf and its largest
difference), the loss of every step (train_metrics.jsonl), and the final
test metrics when the runs reach the end of training (N = 0, the default,
means the whole run). One line per comparison; exit status 1 when a
guarantee that should hold does not.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from absl import flags
from ml_collections import config_flags
import numpy as np

from lt_calib import cli
from lt_calib.errors import ConfigError

FLAGS = flags.FLAGS
MODES = ("repeat", "resume", "devices")
# Metrics compared at the end of a whole run.
FINAL_METRICS = ("top1", "top5", "mean_class_acc", "ece", "mce", "nll", "brier")


def define_flags():
  """Defined only when run as a program, so importing this module is safe."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                  lock_config=True)
  flags.DEFINE_integer("steps", 0, "Steps to train; 0 = the whole run.")
  flags.DEFINE_list("mode", ["repeat", "resume"], f"Comparisons, of {MODES}.")
  flags.DEFINE_string("workdir", None, "Folder for the runs; default a temporary one.")
  flags.mark_flags_as_required(["config"])


def forwarded_config_args(argv) -> list:
  """The --config=... and --config.x=v arguments, verbatim, for lt_calib.main."""
  out, take_next = [], False
  for arg in argv[1:]:
    if take_next:
      out.append(arg)
      take_next = False
    elif re.match(r"--config(\.|=|$)", arg):
      out.append(arg)
      take_next = "=" not in arg
  return out


class Trainer:
  """Runs `python -m lt_calib.main` in fresh processes with the checked config."""

  def __init__(self, config_args: list, root: pathlib.Path, steps: int):
    self.config_args, self.root, self.steps = config_args, root, steps

  def run(self, name: str, stop_at: int | None = None, env: dict | None = None):
    """Trains (or continues) the run `name`; returns its folder."""
    workdir = self.root / name
    command = [sys.executable, "-m", "lt_calib.main", *self.config_args,
               f"--workdir={workdir}", "--config.log_every_steps=1"]
    stop = stop_at if stop_at is not None else (self.steps or None)
    if stop:
      command.append(f"--stop_at_step={stop}")
    result = subprocess.run(command, env={**os.environ, **(env or {})},
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"training {name} failed (status {result.returncode}):\n"
                         f"{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return workdir


def read_run(workdir: pathlib.Path) -> dict:
  """Fingerprint, per-step losses, final metrics and parameters of a run."""
  from lt_calib import checkpointing  # pylint: disable=g-import-not-at-top
  losses = {}
  for line in (workdir / "train_metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    losses[record["step"]] = record["loss"]
  summary_path = workdir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
  step, state = checkpointing.read_state_tree(workdir)
  manager = checkpointing.make_manager(workdir, 1, read_only=True)
  meta = checkpointing.read_meta(manager, step)
  manager.close()
  return {"step": step, "fingerprint": meta["fingerprint"], "losses": losses,
          "final": None if summary is None else summary["final"],
          "tree": {"params": state["params"], "batch_stats": state["batch_stats"]}}


def leaf_differences(tree_a, tree_b) -> list:
  """(path, largest absolute difference, largest relative difference) per leaf."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves_a = jax.tree_util.tree_flatten_with_path(tree_a)[0]
  leaves_b = jax.tree_util.tree_flatten_with_path(tree_b)[0]
  out = []
  for (path, a), (_, b) in zip(leaves_a, leaves_b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    scale = np.maximum(np.abs(a), np.abs(b))
    relative = np.where(scale > 0, diff / np.where(scale > 0, scale, 1), 0)
    out.append((jax.tree_util.keystr(path), float(diff.max(initial=0)),
                float(relative.max(initial=0))))
  return out


def compare(label: str, a: dict, b: dict, exact: bool) -> bool:
  """Prints one line per comparison; returns True if the guarantee holds."""
  ok = True
  same = a["fingerprint"] == b["fingerprint"]
  diffs = leaf_differences(a["tree"], b["tree"])
  if same:
    print(f"{label}: parameters identical (fingerprint {a['fingerprint'][:16]}..., "
          f"step {a['step']})")
  else:
    first = next((d for d in diffs if d[1] > 0), diffs[0])
    worst = max(diffs, key=lambda d: d[2])
    print(f"{label}: parameters differ: first differing leaf {first[0]} (largest "
          f"difference {first[1]:.3g}); largest relative difference {worst[2]:.3g} "
          f"in {worst[0]}")
    ok = not exact
  steps = sorted(set(a["losses"]) & set(b["losses"]))
  loss_a = np.array([a["losses"][s] for s in steps])
  loss_b = np.array([b["losses"][s] for s in steps])
  unequal = np.flatnonzero(loss_a != loss_b)
  if not unequal.size:
    print(f"{label}: per-step losses identical ({len(steps)} steps)")
  else:
    relative = np.abs(loss_a - loss_b) / np.maximum(np.abs(loss_a), 1e-12)
    print(f"{label}: per-step losses differ from step {steps[unequal[0]]} on; largest "
          f"relative difference {relative.max():.3g}")
    ok = ok and not exact and relative[0] <= 1e-3
  if a["final"] and b["final"]:
    keys = [k for k in FINAL_METRICS if k in a["final"] and k in b["final"]]
    delta = {k: abs(a["final"][k] - b["final"][k]) for k in keys}
    if not any(delta.values()):
      print(f"{label}: final metrics identical ({', '.join(keys)})")
    else:
      shown = ", ".join(f"{k} {v:.3g}" for k, v in delta.items() if v)
      print(f"{label}: final metrics differ by {shown}")
      ok = ok and not exact
  return ok


def host_device_xla_flags(count: int) -> str:
  """This process's XLA_FLAGS with the CPU host device count set to `count`.

  Every other flag is kept, so a process started with them compiles as this
  one does.
  """
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return f"{flags} --xla_force_host_platform_device_count={count}".strip()


def device_environments() -> tuple:
  """(label, env) of the full device count and of half of it."""
  import jax  # pylint: disable=g-import-not-at-top
  count, backend = jax.device_count(), jax.default_backend()
  if count < 2:
    raise ConfigError(f"--mode=devices needs at least 2 devices; this {backend} has "
                      f"{count} (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=8).")
  half = count // 2
  if backend == "cpu":
    make = lambda n: {"XLA_FLAGS": host_device_xla_flags(n)}
  elif backend == "gpu":
    make = lambda n: {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n))}
  else:
    raise ConfigError(f"--mode=devices supports CPU and GPU hosts, not {backend}.")
  return (f"{count} devices", make(count)), (f"{half} devices", make(half))


def main(argv):
  del argv
  cli.quiet_libraries()
  modes = list(FLAGS.mode)
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    raise ConfigError(f"--mode has unknown entries {unknown}; allowed: {MODES}.")
  _ = FLAGS.config  # Parsed now: a bad file or override fails before any run.
  root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="lt_calib_check_"))
  root.mkdir(parents=True, exist_ok=True)
  trainer = Trainer(forwarded_config_args(sys.argv), root, FLAGS.steps)
  print(f"runs in {root}")
  ok = True
  if {"repeat", "resume"} & set(modes):
    first = read_run(trainer.run("first"))
    if "repeat" in modes:
      ok &= compare("repeat", first, read_run(trainer.run("second")), exact=True)
    if "resume" in modes:
      stop = max(first["step"] // 2, 1)
      trainer.run("resumed", stop_at=stop)
      resumed = read_run(trainer.run("resumed"))
      ok &= compare(f"resume (stopped at step {stop})", first, resumed, exact=True)
  if "devices" in modes:
    (label_a, env_a), (label_b, env_b) = device_environments()
    run_a = read_run(trainer.run("devices_all", env=env_a))
    run_b = read_run(trainer.run("devices_half", env=env_b))
    ok &= compare(f"devices ({label_a} vs {label_b})", run_a, run_b, exact=False)
  print("all guarantees hold" if ok else "a guarantee that should hold does not")
  return 0 if ok else 1


if __name__ == "__main__":
  define_flags()
  cli.run(main)
