"""Host data to global device arrays, and evaluation counted exactly once.

Every global batch is split over the mesh's 'data' axis. With several
processes each one feeds only the rows its own devices hold
(`jax.make_array_from_process_local_data`); with one process that is the
whole batch. Evaluation batches are padded to one fixed shape and carry each
row's position in the split (-1 for padding), so the gathered logits are put
back in split order and every image is counted once, on any device or
process count.
"""

from typing import Iterator

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from lt_calib.errors import ConfigError


def replicate(tree, mesh):
  """Puts a pytree, identical on every process, on every device of the mesh.

  `jax.device_put` cannot target devices of other processes; each process
  instead builds its own shards of the global (replicated) array from its
  copy. Typed PRNG keys travel as their key data.
  """
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    x = local_value(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def local_value(x) -> np.ndarray:
  """The value of an array on this host (a replicated array's local copy)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def process_rows(mesh, global_batch: int) -> slice:
  """The rows of a global batch that this process's devices hold.

  Args:
    mesh: the training mesh (axis 'data').
    global_batch: rows of the global batch.

  Returns:
    slice [start, stop) of the rows this process must feed.

  Raises:
    ConfigError: the rows are not one contiguous block (a mesh whose device
      order interleaves processes), or the batch does not split evenly.
  """
  sharding = NamedSharding(mesh, P("data"))
  if global_batch % jax.device_count():
    raise ConfigError(f"batch of {global_batch} rows does not split over "
                      f"{jax.device_count()} devices; use a multiple.")
  blocks = sorted(index[0].indices(global_batch)[:2] for index in
                  sharding.addressable_devices_indices_map((global_batch,)).values())
  start, stop = blocks[0][0], blocks[-1][1]
  if sum(b - a for a, b in blocks) != stop - start:
    raise ConfigError("this process's devices do not hold one contiguous block of the "
                      "batch; build the mesh with devices ordered by process.")
  return slice(start, stop)


def to_global(local_tree, mesh, global_batch: int):
  """Assembles per-process rows into global arrays sharded on 'data'.

  Args:
    local_tree: pytree of numpy arrays whose leading axis holds this
      process's rows (`process_rows`).
    mesh: the training mesh.
    global_batch: rows of the global batch.

  Returns:
    The same pytree of global jax.Arrays of leading size `global_batch`.
  """
  sharding = NamedSharding(mesh, P("data"))

  def assemble(local):
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(
        sharding, local, (global_batch,) + local.shape[1:])

  return jax.tree.map(assemble, local_tree)


def in_memory_eval_batches(images: np.ndarray, labels: np.ndarray, global_batch: int,
                           rows: slice) -> Iterator[dict]:
  """Padded evaluation batches of an in-memory split, this process's rows.

  Args:
    images: uint8 [M, H, W, 3], the whole split (every process has it).
    labels: int [M].
    global_batch: rows per global batch.
    rows: this process's rows of each global batch (`process_rows`).

  Yields:
    {'image', 'label', 'index'} with `rows.stop - rows.start` rows; 'index'
    is the position in the split, -1 for padding.
  """
  for start in range(0, len(images), global_batch):
    index = np.arange(start, start + global_batch)[rows]
    valid = index < len(images)
    safe = np.where(valid, index, 0)
    yield {"image": np.where(valid[:, None, None, None], images[safe], 0).astype(np.uint8),
           "label": np.where(valid, labels[safe], 0).astype(np.int32),
           "index": np.where(valid, index, -1).astype(np.int32)}


def gather_logits(eval_fn, state, batches: Iterator[dict], num_examples: int, mesh,
                  global_batch: int) -> np.ndarray:
  """Logits of a whole split, in split order, on every process.

  Args:
    eval_fn: jitted (state, images, index) -> (logits, index), both
      replicated.
    state: the TrainState.
    batches: this process's padded batches (same count on every process).
    num_examples: M, the size of the split.
    mesh: the training mesh.
    global_batch: rows per global batch.

  Returns:
    float32 [M, C] logits.

  Raises:
    RuntimeError: some image was seen twice or never (a bug in the batching).
  """
  logits_out, seen = None, np.zeros(num_examples, np.int64)
  for batch in batches:
    images, index = to_global((batch["image"], batch["index"].astype(np.int32)), mesh,
                              global_batch)
    logits, index = eval_fn(state, images, index)
    logits, index = local_value(logits).astype(np.float32), local_value(index)
    if logits_out is None:
      logits_out = np.zeros((num_examples, logits.shape[-1]), np.float32)
    valid = index >= 0
    logits_out[index[valid]] = logits[valid]
    np.add.at(seen, index[valid], 1)
  if num_examples and (logits_out is None or not np.all(seen == 1)):
    raise RuntimeError("evaluation did not see every image exactly once "
                       f"(min {seen.min()}, max {seen.max()} times).")
  return logits_out
