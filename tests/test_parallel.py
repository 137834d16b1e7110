"""Which rows each process feeds, on meshes in any device order."""

import collections
import itertools

import jax
from jax.experimental import mesh_utils
import numpy as np
import pytest

from lt_calib import parallel
from lt_calib.errors import ConfigError

# What JAX's mesh builder reads of a TPU device.
FakeTpu = collections.namedtuple(
    "FakeTpu", "id platform device_kind process_index coords core_on_chip slice_index")


def v4_slice(chips_xyz):
  """Devices of a v4 slice: one per chip, each host owning a 2x2x1 block of chips."""
  size_x, size_y, size_z = chips_xyz
  devices = []
  for index, (z, y, x) in enumerate(itertools.product(range(size_z), range(size_y),
                                                      range(size_x))):
    host = y // 2 + (size_y // 2) * z
    devices.append(FakeTpu(index, "tpu", "TPU v4", host, (x, y, z), 0, 0))
  return devices


@pytest.mark.parametrize("name, chips, hosts, pattern", [
    ("v4-32", (2, 2, 4), 4, [0, 1, 2, 3] * 4),
    ("v4-64", (2, 4, 4), 8, ([0, 2, 4, 6] * 2 + [1, 3, 5, 7] * 2) * 2),
])
def test_each_host_of_a_v4_slice_feeds_exactly_its_devices_rows(name, chips, hosts, pattern):
  del name
  mesh_devices = mesh_utils.create_device_mesh((len(v4_slice(chips)),),
                                               devices=v4_slice(chips))
  owners = np.array([d.process_index for d in mesh_devices.reshape(-1)])
  # The order the issue reproduced: hosts interleave along the data axis.
  assert owners.tolist() == pattern
  batch = 4 * len(owners)  # 4 rows per chip.
  rows = {p: parallel.rows_of_process(owners, batch, p) for p in range(hosts)}
  assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(batch))
  for p, held in rows.items():
    assert len(held) == batch // hosts and np.all(np.diff(held) > 0)
    # Row r lives on mesh position r // 4; that device belongs to host p.
    assert np.all(owners[held // 4] == p)
  # Host 0 of a v4-32 holds rows 0-3, 16-19, 32-35, 48-51: not one block.
  if hosts == 4:
    assert rows[0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51]


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
  with pytest.raises(ConfigError, match="does not split over 4 devices"):
    parallel.rows_of_process(np.array([0, 0, 1, 1]), 10, 0)


def test_rows_round_trip_through_a_mesh_in_any_order():
  devices = jax.devices()
  order = devices[::-1] if len(devices) > 1 else devices
  mesh = parallel.make_mesh(order)
  rows = parallel.process_rows(mesh, 8 * len(devices))
  assert rows.tolist() == list(range(8 * len(devices)))  # One process holds all.
  local = np.arange(len(rows) * 3).reshape(len(rows), 3)
  array = parallel.to_global(local, mesh, len(rows))
  np.testing.assert_array_equal(parallel.local_rows(array), local)
  np.testing.assert_array_equal(np.asarray(array), local)
