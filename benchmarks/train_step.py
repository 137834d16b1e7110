"""Train-step throughput of the compiled step (images/s), ResNet-32, batch 128.

Times `update` (sampling + augmentation + UniMix + Bayias + SGD) on the real
CIFAR-10-LT data after warm-up, syncing on the result before reading the clock.

  python benchmarks/train_step.py [--steps=50] [--batch_size=128] [--mix=unimix]
"""

import argparse
import json
import time

import jax

from configs import cifar10_lt
from lt_calib import parallel
from lt_calib.train import setup as setup_lib
from lt_calib.data import sources


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--mix", default="unimix")
  parser.add_argument("--loss", default="bayias")
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  config = cifar10_lt.get_config()
  config.batch_size, config.mix.name, config.loss.name = args.batch_size, args.mix, args.loss
  config.model.dtype = args.dtype
  setup = setup_lib.build_for([config], sources.load_dataset(config.dataset), parallel.make_mesh())
  update, state = setup.update, setup.state
  arrays = (setup.feed.fed(0, setup.run_keys),) + tuple(setup.arrays)
  state, stats = update(state, *arrays)  # Compile and warm up.
  jax.block_until_ready(stats["loss"])
  start = time.perf_counter()
  for _ in range(args.steps):
    state, stats = update(state, *arrays)
  jax.block_until_ready((state.params, stats["loss"]))
  seconds = time.perf_counter() - start
  print(json.dumps({"images_per_s": args.steps * args.batch_size / seconds,
                    "ms_per_step": 1000 * seconds / args.steps, "steps": args.steps,
                    "batch_size": args.batch_size, "mix": args.mix, "loss": args.loss,
                    "dtype": args.dtype, "device": str(jax.devices()[0]),
                    "num_devices": jax.device_count(), "jax": jax.__version__}))


if __name__ == "__main__":
  main()
