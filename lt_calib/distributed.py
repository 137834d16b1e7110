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
# finds by itself (`jax.distributed.initialize()` with no arguments); Cloud
# TPU VMs are recognised from their metadata (`_on_cloud_tpu_vm`).
_CLUSTER_VARIABLES = (
    "TPU_WORKER_HOSTNAMES",      # Cloud TPU VM pod slices.
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",              # Slurm (one task per node or per GPU).
    "OMPI_COMM_WORLD_SIZE",      # Open MPI (mpirun).
)


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM, where JAX finds the slice from the VM metadata.

  Such VMs set none of the variables above (those are GKE's). JAX's own
  check (private, hence guarded) asks the metadata server only where libtpu
  found TPU hardware, so other machines never wait on the network.
  """
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  if not getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
    return False
  try:
    return bool(cloud_tpu_cluster.GceTpuCluster.is_env_present())
  except Exception:  # pylint: disable=broad-except
    return False


def _cluster_detected() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:  # A single-host TPU VM lists one host: nothing to join.
    return True
  return (any(os.environ.get(name) for name in _CLUSTER_VARIABLES[1:])
          or _on_cloud_tpu_vm())


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime when the run spans several processes.

  Args:
    mode: 'off' never starts it; 'on' always does (with the given address, or
      JAX's cluster detection when none is given); 'auto' starts it when a
      coordinator address is given or a multi-host cluster is detected.
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
                       and not _cluster_detected()):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def is_main_process() -> bool:
  """True on the process that writes logs, metrics.jsonl, summary.json, reports."""
  return jax.process_index() == 0
