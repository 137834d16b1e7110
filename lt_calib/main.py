"""Entry point: `python -m lt_calib.main --config=configs/cifar10_lt.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g.
`--config.loss.name=ce --config.mix.name=none`. Variants come after a colon:
`--config=configs/cifar10_lt.py:smoke`.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory; an existing run there is resumed.")
config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # TensorFlow is imported only by the TFDS source and the TensorBoard
  # writer; keep its C++ logging quiet when it is.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from lt_calib import train  # pylint: disable=g-import-not-at-top
  logging.info("config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
