"""The plan of K training processes sharing one accelerator (no GPU needed)."""

import os
import stat
import sys

import pytest

from lt_calib import workers
from lt_calib.errors import ConfigError


def test_cores_are_split_into_disjoint_sets():
  assert workers.split_cpus(range(16), 4) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11),
                                               (12, 13, 14, 15)]
  assert workers.split_cpus([0, 1, 2, 3, 4], 2) == [(0, 1, 2), (3, 4)]
  # Fewer cores than workers: shared round-robin.
  assert workers.split_cpus([0, 1], 4) == [(0,), (1,), (0,), (1,)]


def test_plan_with_mps_gives_each_worker_its_share():
  launch = workers.plan(4, range(16), "/usr/bin/nvidia-cuda-mps-control", "/tmp/x", 0.9)
  assert [w.cpus for w in launch.workers] == workers.split_cpus(range(16), 4)
  for w in launch.workers:
    assert w.env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"  # 0.9 / 4.
    assert w.env["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/x/mps_pipe"
    assert w.env["CUDA_MPS_LOG_DIRECTORY"] == "/tmp/x/mps_log"
    assert w.env["OMP_NUM_THREADS"] == "4"
  lines = workers.describe(launch)
  assert lines[0].startswith("mps: /usr/bin/nvidia-cuda-mps-control -d with")
  assert lines[1] == ("worker 0: cpus 0,1,2,3; CUDA_MPS_LOG_DIRECTORY=/tmp/x/mps_log "
                      "CUDA_MPS_PIPE_DIRECTORY=/tmp/x/mps_pipe OMP_NUM_THREADS=4 "
                      "XLA_PYTHON_CLIENT_MEM_FRACTION=0.225")


def test_plan_without_mps_sets_no_mps_variables():
  launch = workers.plan(2, range(2), None, "/tmp/x")
  assert launch.mps_control is None
  assert all("CUDA_MPS_PIPE_DIRECTORY" not in w.env for w in launch.workers)
  assert workers.describe(launch)[0] == "mps: off (nvidia-cuda-mps-control not found)"
  with pytest.raises(ConfigError, match="--workers must be >= 1"):
    workers.plan(0, range(2), None, "/tmp/x")


def test_run_starts_and_stops_the_mps_daemon_around_the_workers(tmp_path, monkeypatch):
  # A stand-in control program that records how it was called: the launch
  # must start the daemon with the plan's folders, run the workers with them
  # (each on its own cores), and send 'quit' at the end.
  log = tmp_path / "calls.txt"
  control = tmp_path / "nvidia-cuda-mps-control"
  control.write_text("#!/bin/sh\n"
                     f"echo \"$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat -)\" >> {log}\n")
  control.chmod(control.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
  worker = ("import os; print(os.environ['CUDA_MPS_PIPE_DIRECTORY'], "
            "os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'], sorted(os.sched_getaffinity(0)), "
            f"file=open({str(tmp_path)!r} + '/w%d' % os.getpid(), 'w'))")
  codes = workers.run([sys.executable, "-c", worker], num_workers=2, memory_fraction=0.8)
  assert codes == [0, 0]
  calls = log.read_text().splitlines()
  assert len(calls) == 2 and calls[0].startswith("-d pipe=") and calls[1].endswith("stdin=quit")
  pipe = calls[0].split("pipe=")[1].split()[0]
  assert pipe.endswith("/mps_pipe") and not os.path.exists(pipe)  # Removed afterwards.
  seen = [p.read_text().split() for p in tmp_path.glob("w*")]
  assert len(seen) == 2 and {s[0] for s in seen} == {pipe} and {s[1] for s in seen} == {"0.400"}
  cores = sorted(os.sched_getaffinity(0))
  expected = [str(list(c)).replace(" ", "") for c in workers.split_cpus(cores, 2)]
  assert sorted("".join(s[2:]) for s in seen) == sorted(expected)


@pytest.mark.slow  # Starts a process.
def test_grid_prints_its_worker_plan(tmp_path):
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, "-m", "lt_calib.grid", "--config=configs/grids/table4.py:smoke",
       f"--workdir={tmp_path}", "--workers=2", "--plan_only"], cwd=REPO,
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("mps: ")  # Here: off, no MPS control program.
  assert [l.split(":")[0] for l in lines[1:3]] == ["worker 0", "worker 1"]
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.450" in lines[1]
  assert lines[3] == (f"command: {sys.executable} -m lt_calib.grid "
                      f"--config=configs/grids/table4.py:smoke --workdir={tmp_path}")
  assert not any(tmp_path.iterdir())  # Nothing trained.
