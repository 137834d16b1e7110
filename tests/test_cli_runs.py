"""The trainer as users run it: console, preemption, crashes, several processes, checks.

Every test here starts `python -m lt_calib.main` (or `lt_calib.check`) in
fresh processes on a tiny CIFAR-10-LT config: ResNet-8 of width 4, 12 steps
of 1,024 images per epoch, 200 test images.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lt_calib import checkpointing
from tests.conftest import REPO

TINY = ["--config=configs/cifar10_lt.py:smoke", "--config.model.width=4",
        "--config.batch_size=1024", "--config.dataset.test_subset=200",
        "--config.log_every_steps=4"]


def environment(devices=1, **extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def main_command(workdir, *flags):
  return [sys.executable, "-m", "lt_calib.main", *TINY, f"--workdir={workdir}", *flags]


def run_main(workdir, *flags, devices=1, **extra):
  return subprocess.run(main_command(workdir, *flags), cwd=REPO, capture_output=True,
                        text=True, env=environment(devices, **extra), check=False)


def summary(workdir):
  return json.loads(pathlib.Path(workdir, "summary.json").read_text())


def train_records(workdir):
  path = pathlib.Path(workdir, "train_metrics.jsonl")
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cifar10_file):
  """A whole 2-epoch run, the reference of the preemption tests."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = run_main(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_console_shows_the_essentials_first(uninterrupted):
  workdir, result = uninterrupted
  lines = (result.stdout + result.stderr).splitlines()
  first_progress = next(i for i, l in enumerate(lines) if l.startswith("epoch 1 step 4/24"))
  header = "\n".join(lines[:first_progress])
  assert first_progress <= 15, header
  assert "data: offline:" in header and "cifar10_jpeg.npz" in header
  assert "devices: 1 x" in header and str(workdir) in header
  assert "Traceback" not in result.stderr and " INFO " not in result.stdout + result.stderr
  assert any(l.startswith("done: top-1") for l in lines)


def test_sigterm_mid_epoch_checkpoints_and_the_same_command_resumes(tmp_path,
                                                                     uninterrupted):
  reference, _ = uninterrupted
  process = subprocess.Popen(main_command(tmp_path), cwd=REPO, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not any(r["step"] >= 4 for r in train_records(tmp_path)):
    assert process.poll() is None and time.time() < deadline, process.communicate()
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 143, stderr[-3000:]
  stopped = next(l for l in stdout.splitlines() if l.startswith("stopped at step"))
  step = int(stopped.split()[3])
  assert 4 < step < 24 and "rerun the same command to resume" in stopped
  assert checkpointing.read_state_tree(tmp_path)[0] == step  # Saved where it stopped.
  again = run_main(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming at step {step}" in again.stdout
  assert summary(tmp_path)["fingerprint"] == summary(reference)["fingerprint"]


def test_sigkill_while_saving_leaves_the_previous_checkpoint(tmp_path, uninterrupted):
  reference, _ = uninterrupted
  killed = run_main(tmp_path, LT_CALIB_TEST_KILL_DURING_SAVE="24")
  assert killed.returncode == -signal.SIGKILL
  assert checkpointing.read_state_tree(tmp_path)[0] == 12  # Not the half-written 24.
  again = run_main(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming at step 12" in again.stdout
  assert summary(tmp_path)["fingerprint"] == summary(reference)["fingerprint"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_of_two_devices_match_one_of_four(tmp_path, cifar10_file):
  single = run_main(tmp_path / "single", devices=4)
  assert single.returncode == 0, single.stderr[-3000:]
  port, shared = free_port(), tmp_path / "multi"
  processes = [subprocess.Popen(
      main_command(shared, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                   f"--process_id={rank}"), cwd=REPO, env=environment(2),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  first_single, first_multi = train_records(tmp_path / "single")[0], train_records(shared)[0]
  assert first_single["step"] == first_multi["step"] == 4
  np.testing.assert_allclose(first_multi["loss"], first_single["loss"], rtol=1e-4)
  a, b = summary(shared), summary(tmp_path / "single")
  assert abs(a["final"]["top1"] - b["final"]["top1"]) <= 0.01
  assert a["environment"]["process_count"] == 2 and a["environment"]["device_count"] == 4
  # Only process 0 talks and writes; process 1 trains silently (but for the
  # lines Gloo, JAX's CPU collectives library, prints when ranks connect).
  assert "done: top-1" in outputs[0][0]
  assert [l for l in outputs[1][0].splitlines() if not l.startswith("[Gloo]")] == []


CHECK = [sys.executable, "-m", "lt_calib.check", *TINY, "--steps=8"]


def test_check_finds_repeat_and_resume_identical(tmp_path, cifar10_file):
  result = subprocess.run([*CHECK, f"--workdir={tmp_path}"], cwd=REPO, env=environment(),
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  lines = result.stdout.splitlines()
  for label in ("repeat", "resume (stopped at step 4)"):
    assert f"{label}: parameters identical" in result.stdout, lines
    assert f"{label}: per-step losses identical (8 steps)" in result.stdout, lines


def test_check_catches_a_run_that_is_not_reproducible(tmp_path, cifar10_file):
  result = subprocess.run([*CHECK, "--mode=repeat", f"--workdir={tmp_path}"], cwd=REPO,
                          env=environment(LT_CALIB_TEST_WALL_CLOCK_NOISE="1"),
                          capture_output=True, text=True, check=False)
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert "repeat: parameters differ: first differing leaf" in result.stdout
  assert "a guarantee that should hold does not" in result.stdout
