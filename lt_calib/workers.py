"""Several training processes sharing one accelerator: the plan and its launch.

A ResNet-32 step leaves most of a GPU idle, so the grid can run K worker
processes on one machine, each taking the next free cell (lt_calib/grid.py's
per-cell locks). `plan` decides, without touching the GPU, what each worker
gets; `run` carries the plan out:

- CPU cores: the cores this process may use, split into K disjoint sets (a
  worker's host threads, input and dispatch, stay off the others' cores);
- GPU memory: each worker's JAX allocator takes `memory_fraction / K` of the
  device (XLA_PYTHON_CLIENT_MEM_FRACTION) instead of the default 75 % that
  the first worker would take alone;
- NVIDIA MPS, where its control program exists: one MPS daemon started at
  user level for this launch (its pipe and log folders in a fresh temporary
  folder, `nvidia-cuda-mps-control -d`), so the workers' kernels share the
  GPU concurrently instead of time-slicing, and stopped afterwards (`quit`).
  No GPU setting (compute mode, clocks, MIG) is changed.
"""

import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

from lt_calib.errors import ConfigError

MPS_CONTROL = "nvidia-cuda-mps-control"


@dataclasses.dataclass(frozen=True)
class Worker:
  """One worker process: its index, CPU cores and environment additions."""
  index: int
  cpus: tuple
  env: dict


@dataclasses.dataclass(frozen=True)
class Plan:
  """K workers, and the MPS daemon's folders (None: no MPS)."""
  workers: tuple
  mps_pipe_dir: Optional[str]
  mps_log_dir: Optional[str]
  mps_control: Optional[str]


def split_cpus(cpus: Sequence[int], parts: int) -> list:
  """`cpus` in `parts` disjoint runs of near-equal size (each non-empty if possible).

  With fewer cores than workers, workers share cores round-robin.
  """
  cpus = sorted(cpus)
  if len(cpus) < parts:
    return [(cpus[k % len(cpus)],) for k in range(parts)]
  size, extra = divmod(len(cpus), parts)
  out, start = [], 0
  for k in range(parts):
    end = start + size + (1 if k < extra else 0)
    out.append(tuple(cpus[start:end]))
    start = end
  return out


def plan(num_workers: int, cpus: Sequence[int], mps_control: Optional[str],
         folder: str, memory_fraction: float = 0.9) -> Plan:
  """What each of K workers gets (module docstring).

  Args:
    num_workers: K >= 1.
    cpus: the CPU cores available (os.sched_getaffinity(0)).
    mps_control: path of nvidia-cuda-mps-control, or None (no MPS).
    folder: where MPS's pipe and log folders go.
    memory_fraction: share of the GPU's memory all workers take together.

  Returns:
    Plan.
  """
  if num_workers < 1:
    raise ConfigError(f"--workers must be >= 1, got {num_workers}.")
  if not 0 < memory_fraction <= 1:
    raise ConfigError(f"memory fraction must be in (0, 1], got {memory_fraction}.")
  pipe = os.path.join(folder, "mps_pipe") if mps_control else None
  log = os.path.join(folder, "mps_log") if mps_control else None
  workers = []
  for k, cores in enumerate(split_cpus(cpus, num_workers)):
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{memory_fraction / num_workers:.3f}",
           # Host-side thread pools sized to the worker's own cores.
           "OMP_NUM_THREADS": str(len(cores))}
    if mps_control:
      env.update(CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY=log)
    workers.append(Worker(k, cores, env))
  return Plan(tuple(workers), pipe, log, mps_control)


def describe(launch: Plan) -> list:
  """One line per worker (and the MPS daemon): what --dry_run prints."""
  lines = []
  if launch.mps_control:
    lines.append(f"mps: {launch.mps_control} -d with CUDA_MPS_PIPE_DIRECTORY="
                 f"{launch.mps_pipe_dir} CUDA_MPS_LOG_DIRECTORY={launch.mps_log_dir}; "
                 "'quit' when the workers end")
  else:
    lines.append("mps: off (nvidia-cuda-mps-control not found)")
  for w in launch.workers:
    env = " ".join(f"{k}={v}" for k, v in sorted(w.env.items()))
    lines.append(f"worker {w.index}: cpus {','.join(map(str, w.cpus))}; {env}")
  return lines


@contextlib.contextmanager
def mps_daemon(launch: Plan):
  """Runs the plan's MPS daemon (if any) for the duration of the block."""
  if not launch.mps_control:
    yield
    return
  env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": launch.mps_pipe_dir,
         "CUDA_MPS_LOG_DIRECTORY": launch.mps_log_dir}
  os.makedirs(launch.mps_pipe_dir, exist_ok=True)
  os.makedirs(launch.mps_log_dir, exist_ok=True)
  subprocess.run([launch.mps_control, "-d"], env=env, check=True)
  try:
    yield
  finally:
    subprocess.run([launch.mps_control], input="quit\n", text=True, env=env, check=False)


def run(command: Sequence[str], num_workers: int, memory_fraction: float = 0.9,
        use_mps: bool = True) -> list:
  """Runs `command` as K workers under the plan for this machine; returns exit codes."""
  cpus = sorted(os.sched_getaffinity(0))
  mps = shutil.which(MPS_CONTROL) if use_mps else None
  with tempfile.TemporaryDirectory(prefix="lt_calib_workers_") as folder:
    launch = plan(num_workers, cpus, mps, folder, memory_fraction)
    with mps_daemon(launch):
      processes = [subprocess.Popen(
          list(command), env={**os.environ, **w.env},
          preexec_fn=lambda cores=w.cpus: os.sched_setaffinity(0, cores))
                   for w in launch.workers]
      return [p.wait() for p in processes]
