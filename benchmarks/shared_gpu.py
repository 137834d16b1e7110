"""Aggregate training images/s of K processes sharing one accelerator.

  python benchmarks/shared_gpu.py --workers=1,2,4,8 [--mps=both|on|off]
      [-- train_throughput.py flags, e.g. --modes=jax_epoch_f32 --steps=5 --repeats=3]

For each K (and with and without NVIDIA MPS where its control program
exists), starts K copies of `benchmarks/train_throughput.py` under the plan
of `lt_calib.workers` (own CPU cores, 1/K of the GPU memory, one MPS daemon
for the launch) and sums their median images/s. The copies start together
and time the same number of rounds, so their timed windows overlap most of
the time; the sum is an estimate of what K grid workers train together.
Prints one JSON line per (K, MPS) and the ratio to K = 1.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lt_calib import workers  # pylint: disable=g-import-not-at-top,wrong-import-position


def measure(num_workers: int, use_mps: bool, bench_args: list, folder: str) -> dict:
  """Runs K benchmark copies together; returns their summed images/s."""
  out = os.path.join(folder, f"k{num_workers}_{'mps' if use_mps else 'nomps'}")
  os.makedirs(out, exist_ok=True)
  # Each copy appends its JSON lines to its own file (named by its pid).
  script = ("import os, subprocess, sys; sys.exit(subprocess.call([sys.executable, "
            f"{os.path.join(REPO, 'benchmarks', 'train_throughput.py')!r}, *sys.argv[1:], "
            f"'--out=' + os.path.join({out!r}, str(os.getpid()) + '.jsonl')]))")
  codes = workers.run([sys.executable, "-c", script, *bench_args], num_workers,
                      use_mps=use_mps)
  rates = []
  for name in sorted(os.listdir(out)):
    with open(os.path.join(out, name)) as f:
      lines = [json.loads(l) for l in f if l.strip()]
    rates += [l["images_per_s"] for l in lines if "mode" in l and "images_per_s" in l]
  return {"workers": num_workers, "mps": use_mps, "exit_codes": codes,
          "per_worker_images_per_s": rates, "images_per_s": sum(rates)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", default="1,2,4,8")
  parser.add_argument("--mps", default="both", choices=("both", "on", "off"))
  args, bench_args = parser.parse_known_args()
  bench_args = [a for a in bench_args if a != "--"] or ["--modes=jax_epoch_f32"]
  have_mps = shutil.which(workers.MPS_CONTROL) is not None
  settings = {"both": (False, True), "on": (True,), "off": (False,)}[args.mps]
  settings = [m for m in settings if have_mps or not m]
  base = {}
  with tempfile.TemporaryDirectory(prefix="lt_calib_shared_gpu_") as folder:
    for use_mps in settings:
      for k in (int(x) for x in args.workers.split(",")):
        result = measure(k, use_mps, bench_args, folder)
        base.setdefault(use_mps, result["images_per_s"] if k == 1 else None)
        if base[use_mps]:
          result["ratio_to_one"] = result["images_per_s"] / base[use_mps]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
