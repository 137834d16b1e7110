"""The trainer as users run it: console, preemption, crashes, several processes, checks.

Every test here starts `python -m lt_calib.main` (or `lt_calib.check`) in
fresh processes on a tiny CIFAR-10-LT config: ResNet-8 of width 4, 12 steps
of 1,024 images per epoch, 200 test images.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from lt_calib import check, checkpointing
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
  killed = subprocess.run(
      [sys.executable, "-m", "tests.drivers.kill_during_save", "--kill_at_step=24", *TINY,
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      env=environment(), check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert checkpointing.read_state_tree(tmp_path)[0] == 12  # Not the half-written 24.
  again = run_main(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming at step 12" in again.stdout
  assert summary(tmp_path)["fingerprint"] == summary(reference)["fingerprint"]


CHECK = [sys.executable, "-m", "lt_calib.check", *TINY, "--steps=8"]


def test_check_finds_repeat_and_resume_identical(tmp_path, cifar10_file):
  result = subprocess.run([*CHECK, f"--workdir={tmp_path}"], cwd=REPO, env=environment(),
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  lines = result.stdout.splitlines()
  for label in ("repeat", "resume (stopped at step 4)"):
    assert f"{label}: parameters identical" in result.stdout, lines
    assert f"{label}: per-step losses identical (8 steps)" in result.stdout, lines


def test_check_reports_runs_that_differ(tmp_path, uninterrupted, capsys):
  reference, _ = uninterrupted
  other = run_main(tmp_path, "--config.seed=1")
  assert other.returncode == 0, other.stderr[-3000:]
  ok = check.compare("repeat", check.read_run(pathlib.Path(reference)),
                     check.read_run(tmp_path), exact=True)
  printed = capsys.readouterr().out
  assert not ok
  assert "repeat: parameters differ: first differing leaf" in printed
  assert "repeat: per-step losses differ from step 4 on" in printed
  assert "repeat: final metrics differ by " in printed


def test_a_second_start_loads_its_programs_from_the_compilation_cache(tmp_path, cifar10_file):
  cache = tmp_path / "cache"
  summaries = []
  for k in range(2):
    result = run_main(tmp_path / f"run{k}", "--config.num_epochs=1",
                      JAX_COMPILATION_CACHE_DIR=str(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    summaries.append(summary(tmp_path / f"run{k}")["compilation_cache"])
  cold, warm = summaries
  assert cold["dir"] == warm["dir"] == str(cache)
  assert cold["loaded"] == 0 and cold["compiled"] > 0
  # Every program the cold start compiled (the step, evaluation, ...) is loaded.
  assert warm["loaded"] >= cold["compiled"] and warm["compiled"] == 0
