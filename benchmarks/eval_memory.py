"""Peak host memory of one evaluation the size of iNaturalist 2018's test set.

  python benchmarks/eval_memory.py [--classes=8142] [--images=24426] [--batch=512]

Each mode runs in a fresh process (so peaks do not mix) and prints one JSON
line: the peak resident memory (ru_maxrss) of the evaluation itself, above
what the process held before it started, and its wall time.

- `gather` (what every evaluation did before): every logit of the split on
  the host, then `summary.summarize` in float64.
- `statistics` (every evaluation now, one host): per-batch sums on the
  devices (`evaluation.run`), this process's float32 logits kept for ACE and
  TACE, computed a block of classes at a time.
- `statistics_only` (every evaluation but the last on several hosts): the
  sums alone; ACE/TACE are left out.

The model is synthetic: each test image carries its row number in its
pixels and the "network" turns that number into a row of Gaussian logits
(with a bump on the true class), so the figure is the evaluation's, not a
ResNet's.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("gather", "statistics", "statistics_only")


def peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def run_mode(mode: str, classes: int, images: int, batch: int) -> dict:
  """One evaluation in this process; returns the measurements."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lt_calib import evaluation, parallel  # pylint: disable=g-import-not-at-top
  from lt_calib.calibration import summary as summary_lib  # pylint: disable=g-import-not-at-top
  from lt_calib.data import sources  # pylint: disable=g-import-not-at-top

  labels = np.arange(images, dtype=np.int32) % classes
  # Row number in the first three pixels (base 256), nothing else stored.
  rows = np.arange(images)
  pixels = np.stack([rows % 256, rows // 256 % 256, rows // 65536], 1).astype(np.uint8)
  test_images = pixels[:, None, None, :]
  train_counts = np.maximum(1000 * 0.998 ** np.arange(classes), 2).astype(np.int64)

  def logits_fn(state, image):
    row = (image[:, 0, 0, 0].astype(jnp.int32) + 256 * image[:, 0, 0, 1].astype(jnp.int32)
           + 65536 * image[:, 0, 0, 2].astype(jnp.int32))
    noise = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(state, r), (classes,)))(row)
    return 2.0 * noise + 4.0 * jax.nn.one_hot(row % classes, classes)

  mesh = parallel.make_mesh()
  step = evaluation.make_step(logits_fn, classes, 15, mesh)
  key = jax.random.key(0)
  feed_rows = parallel.process_rows(mesh, batch)
  start_mb, start = peak_mb(), time.perf_counter()
  result = evaluation.run(step, key, sources.padded_batches(test_images, labels, batch,
                                                            feed_rows),
                          images, mesh, batch, keep_logits=mode != "statistics_only")
  if mode == "gather":
    record = summary_lib.summarize(evaluation.split_logits(result), labels, train_counts)
  elif mode == "statistics":
    record = evaluation.summarize(result.statistics, train_counts,
                                  evaluation.split_logits(result), labels)
  else:
    record = evaluation.summarize(result.statistics, train_counts)
  return {"mode": mode, "classes": classes, "images": images, "batch": batch,
          "peak_mb_above_start": round(peak_mb() - start_mb, 1),
          "peak_mb": round(peak_mb(), 1), "seconds": round(time.perf_counter() - start, 1),
          "top1": record["top1"], "ece": record["ece"], "tace": record["tace"],
          "devices": jax.device_count(), "backend": jax.default_backend()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--classes", type=int, default=8142)
  parser.add_argument("--images", type=int, default=24426)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(run_mode(args.child, args.classes, args.images, args.batch)))
    return
  for mode in args.modes.split(","):
    if mode not in MODES:
      parser.error(f"--modes: {mode!r} is not one of {MODES}")
    subprocess.run([sys.executable, __file__, f"--child={mode}", f"--classes={args.classes}",
                    f"--images={args.images}", f"--batch={args.batch}"], check=True,
                   env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
