"""Entry point: `python -m lt_calib.main --config=configs/cifar10_lt.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g.
`--config.loss.name=ce --config.mix.name=none`. Variants come after a colon:
`--config=configs/cifar10_lt.py:smoke`. Several processes (hosts) join one
run with `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`,
or `--distributed=on` on a Cloud TPU pod slice (see launch/README.md).
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from lt_calib import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory (local or gs://); an existing "
                    "run there is resumed.")
config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                lock_config=True)
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Start JAX's multi-process runtime: 'auto' when the flags below "
                  "are given or a cluster (Slurm, Open MPI, GKE) is detected; 'on' on a "
                  "Cloud TPU VM slice.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's rank, 0..num_processes-1.")
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose saved "
                  "config differs from this one (recorded in summary.json).")
flags.DEFINE_integer("stop_at_step", None, "Checkpoint and stop at this global "
                     "step (with compiled chunks, the end of the chunk holding it), as on "
                     "preemption; the same command resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.check_workdir(FLAGS.workdir)  # Before JAX loads: a bad path fails at once.
  cli.quiet_libraries()
  # TensorFlow (TFDS, tf.data, TensorBoard) is imported only by some sources
  # and writers; keep its C++ start-up notices off the console when it is.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # TensorFlow announces its oneDNN kernels even then; tf.data's decode and
  # resize do not use them.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  # Imported here so that --help and flag errors answer before JAX loads.
  from lt_calib import compilation, distributed  # pylint: disable=g-import-not-at-top
  from lt_calib.train import trainer  # pylint: disable=g-import-not-at-top
  compilation.enable_persistent_cache()
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id)
  result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                    allow_config_change=FLAGS.allow_config_change,
                                    stop_at_step=FLAGS.stop_at_step)
  if result.get("reason") == "preempted":
    sys.exit(trainer.PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
  cli.run(main)
