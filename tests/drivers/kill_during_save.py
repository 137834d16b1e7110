"""`python -m lt_calib.main` that dies (SIGKILL) while Orbax writes one checkpoint.

  python -m tests.drivers.kill_during_save --kill_at_step=K <lt_calib.main flags>

A test driver: it wraps Orbax's `CheckpointManager.save` so that the process
kills itself right after the save of step K has started, while the
checkpoint's files are still being written in the background.
"""

import os
import signal

from absl import flags
import orbax.checkpoint as ocp

from lt_calib import cli
from lt_calib import main as main_module

flags.DEFINE_integer("kill_at_step", None, "Die while saving this step's checkpoint.")
FLAGS = flags.FLAGS


def main(argv):
  save = ocp.CheckpointManager.save

  def save_then_die(manager, step, *args, **kwargs):
    started = save(manager, step, *args, **kwargs)
    if int(step) == FLAGS.kill_at_step:
      os.kill(os.getpid(), signal.SIGKILL)
    return started

  ocp.CheckpointManager.save = save_then_die
  return main_module.main(argv)


if __name__ == "__main__":
  cli.run(main)
