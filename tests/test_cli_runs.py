"""The trainer as users run it: console, preemption, crashes, the compilation cache, checks.

The tests start `python -m lt_calib.main` (or `lt_calib.check`) in fresh
processes on a tiny CIFAR-10-LT config (helpers.TINY_FLAGS: ResNet-8 of width
4, 12 steps of 128 images per epoch, 200 test images) and compare with the session's
in-process run of the same config (`tiny_run`), bit for bit.
"""

import copy
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lt_calib import check, checkpointing
from tests.conftest import REPO
from tests.helpers import TINY_FLAGS, train_records, xla_environment

pytestmark = pytest.mark.slow  # Every test trains, in processes of its own.

TINY = TINY_FLAGS


def environment(devices=1, **extra):
  return xla_environment(devices, PYTHONUNBUFFERED="1", **extra)


def main_command(workdir, *flags):
  return [sys.executable, "-m", "lt_calib.main", *TINY, f"--workdir={workdir}", *flags]


def summary(workdir):
  return json.loads(pathlib.Path(workdir, "summary.json").read_text())


def test_sigterm_then_sigkill_while_saving_and_the_same_command_resumes(tmp_path, tiny_run):
  # Three processes on one workdir, with the session's compilation cache:
  # 1. SIGTERM mid-epoch: a checkpoint where it stopped. Also what a user
  #    reads (the header first, then progress, no library logs).
  # 2. The same command resumes and dies (SIGKILL) while saving step 24: the
  #    checkpoint before it stays, not the half-written one.
  # 3. The same command resumes from that one and ends bit-identical to the
  #    session's uninterrupted run, loading every program it runs (the
  #    first two ran them all). A rerun that compiles some programs and
  #    loads others: test_multihost.py.
  _, expected = tiny_run
  env = environment()
  workdir = tmp_path / "run"
  process = subprocess.Popen(main_command(workdir), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not any(r["step"] >= 4 for r in train_records(workdir)):
    assert process.poll() is None and time.time() < deadline, process.communicate()
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 143, stderr[-3000:]
  lines = (stdout + stderr).splitlines()
  first_progress = next(i for i, l in enumerate(lines) if l.startswith("epoch 1 step 4/24"))
  header = "\n".join(lines[:first_progress])
  assert first_progress <= 15, header
  assert "data: offline:" in header and "cifar10_jpeg.npz" in header
  assert "devices: 1 x" in header and str(workdir) in header
  assert "Traceback" not in stderr and " INFO " not in stdout + stderr
  stopped = next(l for l in stdout.splitlines() if l.startswith("stopped at step"))
  step = int(stopped.split()[3])
  assert 4 < step < 24 and "rerun the same command to resume" in stopped
  assert checkpointing.read_state_tree(workdir)[0] == step  # Saved where it stopped.

  killed = subprocess.run(
      [sys.executable, "-m", "tests.drivers.kill_during_save", "--kill_at_step=24", *TINY,
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, env=env,
      check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert f"resuming at step {step}" in killed.stdout
  kept = max(step, 12)  # Epochs of 12 steps: a checkpoint at step 12 too.
  assert checkpointing.read_state_tree(workdir)[0] == kept  # Not the half-written 24.

  again = subprocess.run(main_command(workdir), cwd=REPO, capture_output=True, text=True,
                         env=env, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming at step {kept}" in again.stdout
  assert any(l.startswith("done: top-1") for l in again.stdout.splitlines())
  resumed = summary(workdir)
  assert resumed["fingerprint"] == expected["fingerprint"]
  cache = resumed["compilation_cache"]
  assert cache["dir"] == os.environ["JAX_COMPILATION_CACHE_DIR"]  # conftest's.
  assert cache["compiled"] == 0 and cache["loaded"] >= 2


CHECK = [sys.executable, "-m", "lt_calib.check", *TINY, "--steps=8"]


def test_check_finds_resume_identical(tmp_path, cifar10_file):
  # --mode=resume: 3 runs. The repeat mode's claim, a fresh process trains
  # the same bits, is the sequence's above (its last process against the
  # session's in-process run); both modes end in `compare`, tested below.
  result = subprocess.run([*CHECK, "--mode=resume", f"--workdir={tmp_path}"], cwd=REPO,
                          env=environment(), capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  lines = result.stdout.splitlines()
  label = "resume (stopped at step 4)"
  assert f"{label}: parameters identical" in result.stdout, lines
  assert f"{label}: per-step losses identical (8 steps)" in result.stdout, lines
  assert "repeat:" not in result.stdout and lines[-1] == "all guarantees hold"


def test_check_reports_runs_that_differ(tiny_run, capsys):
  # The second run is the first with one bit of one leaf, the loss of step 8
  # and the final top-1 changed: each difference is named.
  reference = check.read_run(pathlib.Path(tiny_run[0]))
  other = copy.deepcopy(reference)
  other["fingerprint"] = "0" * 64
  leaf = np.array(other["tree"]["params"]["Dense_0"]["bias"])
  leaf.view(np.uint32)[3] ^= 1
  other["tree"]["params"]["Dense_0"]["bias"] = leaf
  other["losses"][8] += 1e-3
  other["final"] = {**other["final"], "top1": other["final"]["top1"] + 0.005}
  assert check.compare("repeat", reference, reference, exact=True)
  capsys.readouterr()
  ok = check.compare("repeat", reference, other, exact=True)
  printed = capsys.readouterr().out
  assert not ok
  assert ("repeat: parameters differ: first differing leaf ['params']['Dense_0']"
          "['bias']") in printed
  assert "repeat: per-step losses differ from step 8 on" in printed
  assert "repeat: final metrics differ by top1 0.005" in printed
