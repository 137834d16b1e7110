"""tf.data training-input rate: read + decode + random-resized-crop 224 + flip (images/s).

Builds (once) a fake ImageNet-LT with JPEGs of a realistic ImageNet size
(400 x 350 px, lt_calib.data.fake) and times `StreamingDataset.train_batches`
after a warm-up, as the trainer consumes it (uint8 batches in host memory).
Files sit in the page cache after the first pass, so this measures the CPU
work, not the disk. Repeats the measurement and reports the median and the
spread, in images/s and images/s per CPU core available to the process.

  python benchmarks/input_pipeline.py [--data_dir=/tmp/lt_calib_bench_inputs]
      [--batch_size=128] [--steps=20] [--repeats=5] [--partner] [--no_antialias]
      [--gcs]

`--gcs` uploads the data to a local Cloud Storage emulator (fake-gcs-server,
tests/gcs_emulator.py) and reads it from gs:// through the library's GCS
client (gcsfs): the per-request cost of the remote path on this machine's
loopback, not a real bucket's latency or bandwidth.
"""

import argparse
import contextlib
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import ml_collections
import numpy as np

from lt_calib.data import fake, index_sequence, preprocess, streaming


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def make_data(data_dir: pathlib.Path, image_size: str) -> None:
  if not (data_dir / "ImageNet_LT_train.txt").is_file():
    # 40 classes, 32 down to 4 images: 496 training JPEGs of ~20 KB.
    fake.build(data_dir, num_classes=40, image_size=image_size, max_per_class=32,
               min_per_class=4, val_per_class=0, test_per_class=1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--data_dir", default="/tmp/lt_calib_bench_inputs")
  parser.add_argument("--jpeg_size", default="400x350", help="WIDTHxHEIGHT of the JPEGs")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--partner", action="store_true", help="also decode an R* batch")
  parser.add_argument("--no_antialias", action="store_true")
  parser.add_argument("--gcs", action="store_true",
                      help="read the data from a local GCS emulator (gs://)")
  args = parser.parse_args()
  data_dir = pathlib.Path(args.data_dir)
  make_data(data_dir, args.jpeg_size)
  with contextlib.ExitStack() as stack:
    root = str(data_dir)
    if args.gcs:
      sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
      from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
      import fsspec  # pylint: disable=g-import-not-at-top
      bucket = stack.enter_context(gcs_emulator.running(
          stack.enter_context(tempfile.TemporaryDirectory())))
      root = bucket.folder("inputs")
      fsspec.filesystem("gs").put(f"{data_dir}/", f"{root}/", recursive=True)
    measure(args, root)


def measure(args, root: str) -> None:
  """Times train_batches on the data under `root`; prints one JSON line."""
  preprocess.ANTIALIAS = not args.no_antialias
  dataset = streaming.load_streaming_dataset(ml_collections.ConfigDict(dict(
      name="image_list", num_classes=40, image_root=root, split_dir=root,
      train_list="ImageNet_LT_train.txt", test_list="ImageNet_LT_test.txt",
      image_size=args.image_size)))
  laws = index_sequence.Laws(None, np.log(np.full(40, 1 / 40)) if args.partner else None)
  per_step = args.batch_size * (2 if args.partner else 1)
  rates = []
  for repeat in range(args.repeats):
    batches = dataset.train_batches(seed=repeat, start_step=0, global_batch=args.batch_size,
                                    rows=np.arange(args.batch_size), laws=laws)
    for _ in range(3):  # Warm-up: graph building, thread pools, page cache.
      next(batches)
    start = time.perf_counter()
    for _ in range(args.steps):
      next(batches)
    rates.append(args.steps * per_step / (time.perf_counter() - start))
  cores = len(os.sched_getaffinity(0))
  median = float(np.median(rates))
  print(json.dumps({
      "images_per_s_median": round(median, 1),
      "images_per_s_min": round(min(rates), 1), "images_per_s_max": round(max(rates), 1),
      "images_per_s_per_core": round(median / cores, 1), "cores": cores,
      "cpu": cpu_model(), "load_average": os.getloadavg(), "jpeg_size": args.jpeg_size,
      "image_size": args.image_size, "batch_size": args.batch_size,
      "partner": args.partner, "antialias": preprocess.ANTIALIAS, "steps": args.steps,
      "repeats": args.repeats, "source": "gcs emulator" if args.gcs else "local files"}))


if __name__ == "__main__":
  main()
