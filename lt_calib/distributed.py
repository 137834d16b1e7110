"""JAX's multi-process runtime: when to start it, and who writes files.

One process per host (TPU VM worker, GPU node) runs the same program; they
meet at a coordinator, and `jax.devices()` then lists every process's
devices, so one mesh and one jitted step span the whole slice. Only process
0 writes logs, metrics and reports; Orbax checkpoints are written by all.
"""

import os

import jax

from lt_calib.errors import ConfigError

MODES = ("auto", "on", "off")

# Environment variables that mark a multi-host cluster whose topology JAX
# finds by itself (`jax.distributed.initialize()` with no arguments). A Cloud
# TPU VM sets none of them (the slice is in its metadata, which only JAX's
# private modules read): there `--distributed=on`, which launch/tpu_train.sh
# passes, starts the runtime.
CLUSTER_VARIABLES = (
    "TPU_WORKER_HOSTNAMES",      # TPU pod slices on GKE.
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",              # Slurm (one task per node or per GPU).
    "OMPI_COMM_WORLD_SIZE",      # Open MPI (mpirun).
)


def cluster_detected() -> bool:
  """Whether the environment names a multi-host cluster (CLUSTER_VARIABLES)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:  # A single-host TPU VM lists one host: nothing to join.
    return True
  return any(os.environ.get(name) for name in CLUSTER_VARIABLES[1:])


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime when the run spans several processes.

  Args:
    mode: 'off' never starts it; 'on' always does (with the given address, or
      JAX's cluster detection when none is given: Cloud TPU VMs, Slurm, ...);
      'auto' starts it when a coordinator address is given or
      `cluster_detected()`.
    coordinator_address: HOST:PORT of process 0's coordinator.
    num_processes: number of processes in the run.
    process_id: this process's rank in [0, num_processes).

  Returns:
    True if the runtime was started.

  Raises:
    ConfigError: the flags are incomplete or inconsistent.
  """
  if mode not in MODES:
    raise ConfigError(f"--distributed={mode!r} is unknown; allowed: {MODES}.")
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ConfigError("--coordinator_address, --num_processes and --process_id go "
                      "together: give all three (or none, on a detected cluster).")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes="
                      f"{num_processes}).")
  if mode == "off" and coordinator_address is not None:
    raise ConfigError("--distributed=off contradicts --coordinator_address.")
  if mode == "off" or (mode == "auto" and coordinator_address is None
                       and not cluster_detected()):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def is_main_process() -> bool:
  """True on the process that writes logs, metrics.jsonl, summary.json, reports."""
  return jax.process_index() == 0
