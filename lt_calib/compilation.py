"""Compilation that a second start does not pay for again.

Every entry point (training, the grid, evaluation, the checks) calls
`enable_persistent_cache()` before JAX compiles anything:

- JAX's persistent compilation cache holds every compiled program in a user
  folder (`$JAX_COMPILATION_CACHE_DIR` if set, else `$LT_CALIB_CACHE_DIR/jax`,
  else `~/.cache/lt_calib/jax`), with no minimum compile time or size, so
  the second start of the same run (a resume, the next seed, the next cell
  of a grid) loads its programs instead of compiling them;
- on GPUs, XLA's autotuning results (convolution and GEMM algorithm choices)
  go to a folder beside it (`--xla_gpu_per_fusion_autotune_cache_dir`);
- with LT_CALIB_GPU_COMMAND_BUFFERS=1, XLA:GPU also captures convolutions,
  loops and conditionals in CUDA graphs (`COMMAND_BUFFER_FLAGS`), so a
  compiled epoch is launched as a few graphs instead of hundreds of kernels a
  step. Off until a GPU run has checked that they are captured and the
  numbers unchanged (launch/gpu_session.sh, docs/benchmarks.md).

`CacheCounter` listens to JAX's monitoring events, so a run can say how many
programs it loaded from the cache and how many it compiled.
"""

import os
import pathlib

import jax

COMMAND_BUFFER_FLAGS = ("--xla_gpu_enable_command_buffer=+CONVOLUTION,+WHILE,+CONDITIONAL",
                        "--xla_gpu_graph_min_graph_size=1")
HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"
AUTOTUNE_FLAG = "--xla_gpu_per_fusion_autotune_cache_dir"


def cache_dir() -> pathlib.Path:
  """The folder of the persistent compilation cache."""
  chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if chosen:
    return pathlib.Path(chosen).expanduser()
  root = os.environ.get("LT_CALIB_CACHE_DIR") or pathlib.Path.home() / ".cache" / "lt_calib"
  return pathlib.Path(root).expanduser() / "jax"


def enable_persistent_cache() -> pathlib.Path:
  """Turns the persistent compilation (and GPU autotuning) cache on; returns its folder.

  Call before the first compilation; a cache folder or XLA flag the user set
  is kept.
  """
  folder = cache_dir()
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # XLA reads its flags when the GPU backend starts: before any computation.
  added = []
  flags = os.environ.get("XLA_FLAGS", "")
  if AUTOTUNE_FLAG not in flags:
    autotune = folder.parent / "xla_autotune"
    autotune.mkdir(parents=True, exist_ok=True)
    added.append(f"{AUTOTUNE_FLAG}={autotune}")
  if os.environ.get("LT_CALIB_GPU_COMMAND_BUFFERS") == "1":
    added += [f for f in COMMAND_BUFFER_FLAGS if f.split("=")[0] not in flags]
  os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
  return folder


class CacheCounter:
  """Counts the programs loaded from the persistent cache and compiled afresh."""

  def __init__(self):
    self.hits = self.misses = 0
    jax.monitoring.register_event_listener(self._on_event)

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if event == HIT_EVENT:
      self.hits += 1
    elif event == MISS_EVENT:
      self.misses += 1

  def summary(self) -> dict:
    return {"dir": str(cache_dir()), "loaded": self.hits, "compiled": self.misses}
