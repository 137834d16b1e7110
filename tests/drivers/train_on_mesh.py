"""`python -m lt_calib.main` on the mesh a TPU slice builds (test driver).

  python -m tests.drivers.train_on_mesh <lt_calib.main flags>

A real TPU slice builds its mesh in physical order, which interleaves the
processes along the data axis; CPU devices come ordered by process. This
driver builds the mesh round-robin over processes (p0d0, p1d0, p0d1, ...) and
hands it to `trainer.train_and_evaluate`, so the multi-process tests exercise
the interleaved layout on localhost.
"""

import sys

from absl import flags

from lt_calib import cli
from lt_calib import main as main_module  # Defines the trainer's flags.

FLAGS = flags.FLAGS


def interleaved_devices():
  """Every device, round-robin over processes: p0d0, p1d0, p0d1, p1d1, ..."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  per_process = jax.local_device_count()
  return [devices[p * per_process + k] for k in range(per_process)
          for p in range(jax.process_count())]


def main(argv):
  del argv
  cli.quiet_libraries()
  from lt_calib import distributed, parallel  # pylint: disable=g-import-not-at-top
  from lt_calib.train import trainer  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id)
  mesh = parallel.make_mesh(interleaved_devices())
  result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_at_step=FLAGS.stop_at_step,
                                    mesh=mesh)
  if result.get("reason") == "preempted":
    sys.exit(trainer.PREEMPTED_EXIT_STATUS)


if __name__ == "__main__":
  del main_module
  cli.run(main)
