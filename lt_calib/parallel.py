"""Data parallelism: the mesh, which rows each process feeds, global arrays.

One 1-D mesh spans every device of every process, axis 'data'; a global
batch of B rows is split over it, device i of the mesh holding rows
[i * B/n, (i + 1) * B/n). The mesh's device order is whatever the caller
built: `jax.make_mesh` orders TPU devices by their physical coordinates, so
on a v4/v5 slice the processes interleave along the axis (process of each
position 0,1,2,3,0,1,2,3,... on a v4-32). No code here assumes that a
process holds one contiguous block: each process feeds exactly the rows its
own devices hold (`process_rows`), in increasing order, which is the local
layout `jax.make_array_from_process_local_data` expects.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from lt_calib.errors import ConfigError

AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh, axis 'data'.

  Args:
    devices: the devices in mesh order; None = every device of every
      process, in the order `jax.make_mesh` picks for the hardware.

  Returns:
    The mesh. Auto axis type: the compiler propagates the data sharding from
    the batch constraint (explicit-sharding mode would make every op spell
    it out).
  """
  axis_types = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=axis_types)
  return jax.sharding.Mesh(np.array(list(devices)), (AXIS,), axis_types=axis_types)


def data_sharding(mesh) -> NamedSharding:
  """Rows split over the 'data' axis."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def rows_of_process(process_of_position, global_batch: int, process: int) -> np.ndarray:
  """Rows of a global batch held by the devices of one process.

  Args:
    process_of_position: int [n], the process of each device along the
      mesh's 'data' axis.
    global_batch: B, a multiple of n.
    process: the process asked about.

  Returns:
    int64 sorted rows (B/n for each of the process's devices).

  Raises:
    ConfigError: B does not split evenly over the n devices.
  """
  owners = np.asarray(process_of_position)
  if global_batch % len(owners):
    raise ConfigError(f"batch of {global_batch} rows does not split over "
                      f"{len(owners)} devices; use a multiple.")
  per_device = global_batch // len(owners)
  positions = np.flatnonzero(owners == process)
  return (positions[:, None] * per_device + np.arange(per_device)).reshape(-1).astype(np.int64)


def process_rows(mesh, global_batch: int) -> np.ndarray:
  """The rows of a global batch that this process must feed (sorted)."""
  owners = np.array([d.process_index for d in mesh.devices.reshape(-1)])
  return rows_of_process(owners, global_batch, jax.process_index())


def to_global(local_tree, mesh, global_batch: int):
  """Assembles per-process rows into global arrays sharded on 'data'.

  Args:
    local_tree: pytree of numpy arrays whose leading axis holds this
      process's rows, in the order of `process_rows`.
    mesh: the training mesh.
    global_batch: rows of the global batch.

  Returns:
    The same pytree of global jax.Arrays of leading size `global_batch`.
  """
  sharding = data_sharding(mesh)

  def assemble(local):
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(
        sharding, local, (global_batch,) + local.shape[1:])

  return jax.tree.map(assemble, local_tree)


def replicate(tree, mesh):
  """Puts a pytree, identical on every process, on every device of the mesh.

  Leaves go through host memory: `jax.device_put` places a host array on
  another process's devices (each process supplies its own copy), not an
  array already committed to one local device. Typed PRNG keys travel as
  their key data.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    return jax.device_put(local_value(x), sharding)

  return jax.tree.map(put, tree)


def local_value(x) -> np.ndarray:
  """The value of a replicated array on this host (its local copy)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on 'data', in `process_rows` order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])
