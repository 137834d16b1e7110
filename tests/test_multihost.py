"""Several processes on localhost, as the hosts of a TPU slice: preemption, device order.

A run is tests/drivers/train_on_mesh.py (`python -m lt_calib.main` on a mesh
it builds) in 2 processes of 2 CPU devices each, joined by JAX's distributed
runtime, on the device order a TPU slice has: p0d0, p1d0, p0d1, p1d1, so each
process holds two separate blocks of rows. It streams a generated 12-class
image list from the Cloud Storage emulator into a gs:// workdir, as an
ImageNet-LT run on a pod slice does. The reference is the same run in this
process on one device (the same global batch and keys, so only the order of
float reductions differs).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from lt_calib import checkpointing, evaluate, storage
from lt_calib.train import trainer
from tests.conftest import REPO
from tests.helpers import FAKE_CLASSES, build_fake_lists, streamed_overrides
from tests.test_cli_runs import environment
from tests.test_streaming_train import streamed_config

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, *flags, processes=2, **env):
  """Starts the processes of one run on 2 CPU devices each; returns them, their output in files.

  Files, not pipes: a process whose pipe nobody drains blocks once it is
  full, and the other process then waits for it forever in a collective.
  """
  command = [sys.executable, "-m", "tests.drivers.train_on_mesh", *flags,
             f"--workdir={workdir}", f"--coordinator_address=localhost:{free_port()}",
             f"--num_processes={processes}"]
  started = []
  for rank in range(processes):
    out = tempfile.TemporaryFile("w+")
    started.append((subprocess.Popen(
        [*command, f"--process_id={rank}"], cwd=REPO, env=environment(2, **env),
        stdout=out, stderr=subprocess.STDOUT, text=True), out))
  return started


def finish(processes, timeout=600):
  """(return codes, outputs) once every process has ended."""
  codes, outputs = [], []
  for process, out in processes:
    codes.append(process.wait(timeout=timeout))
    out.seek(0)
    outputs.append(out.read())
  return codes, outputs


def read(path) -> str | None:
  """A local or gs:// file's text (asked of the server), or None."""
  return storage.as_path(path).read_text() if storage.exists(path) else None


def records(path) -> list:
  return [json.loads(l) for l in (read(path) or "").splitlines() if l.strip()]


def run_to_end(workdir, *flags, **kwargs) -> list:
  codes, outputs = finish(start(workdir, *flags, **kwargs))
  assert codes == [0] * len(codes), [o[-3000:] for o in outputs]
  return outputs


# What Gloo, JAX's CPU collectives library, prints when ranks connect: from
# several threads at once, so one message may be cut by another anywhere
# ("[Gloo] Rank [Gloo] Rank 3 is connected to ... is : 3" then "1 is
# connected to ..."): its two fixed pieces are taken out wherever they are.
GLOO = re.compile(r"\[Gloo\] Rank|is connected to \d+ peer ranks\. Expected number "
                  r"of connected peer ranks is :")


# What other libraries log in the glog format, on every host: the Google auth
# libraries when they find no credentials, as with the emulator (a TPU VM has
# its service account: gcsfs's google-auth, TensorStore's C++ provider), and
# TensorFlow when the streamed input imports it (its oneDNN notice, printed
# before absl's logging is set up, with absl's warning that it was).
LIBRARY_LOGS = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ (_default\.py|google_auth_provider\.cc|"
                          r"port\.cc):\d+\] .*$|^WARNING: All log messages before "
                          r"absl::InitializeLog\(\) is called are written to STDERR$",
                          re.MULTILINE)


def quiet_libraries_only(text: str) -> str:
  """A process's output less Gloo's connection messages and other libraries'
  logs (and digits, whitespace): empty if our code printed nothing."""
  return re.sub(r"[\d\s]", "", GLOO.sub("", LIBRARY_LOGS.sub("", text)))


# What the 2-process runs log, per logged step, that must match the run on
# one device: the same global batch and keys, so only the order of float
# reductions differs. A resume from the wrong state, data position or key
# changes them by percents, as does a process feeding rows of the other's
# devices.
LOGGED = ("loss", "grad_norm", "param_norm", "learning_rate")


@pytest.fixture(scope="module")
def fake_lists(tmp_path_factory):
  """A 12-class image-list dataset in the ImageNet-LT layout (lt_calib.data.fake)."""
  return build_fake_lists(tmp_path_factory.mktemp("fake_imagenet_lt"))


# One epoch of 11 steps of 16 images (191 training images), a log line
# every 2 steps, and the ResNet-8 of the CIFAR configs: what is under test is
# the run on several hosts (the ImageNet ResNet, a second epoch and the
# mixing's stop train in test_streaming_train; each would compile another
# program here, and process 1 compiles every program of every run: JAX's
# compilation cache keeps only process 0's).
STREAMED = dict(batch_size=16, log_every_steps=2, num_epochs=1, model__name="resnet_cifar",
                model__depth=8)
LOG, TOTAL = 2, 191 // 16


def streamed_flags(root) -> list:
  return ["--config=configs/imagenet_lt.py:smoke",
          *(f"--config.{field}={value}"
            for field, value in streamed_overrides(root, **STREAMED).items())]


def test_sigterm_to_one_host_stops_both_and_the_rerun_continues_as_one_device(
    tmp_path, fake_lists, gcs, no_report):
  """Lists, images and workdir on gs://, 2 hosts interleaved; SIGTERM, resume, evaluate."""
  import fsspec  # pylint: disable=g-import-not-at-top
  data = gcs.folder("imagenet_lt")
  fsspec.filesystem("gs").put(f"{fake_lists}/", f"{data}/", recursive=True)
  # The reference: the same run in this process, on one device.
  one = trainer.train_and_evaluate(streamed_config(fake_lists, **STREAMED),
                                   str(tmp_path / "one_device"))
  workdir = gcs.folder("preempted")
  # A compilation cache of the run's own, from empty (process 0 writes it).
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
  processes = start(workdir, *streamed_flags(data), **cache)
  # The header's last line comes once both processes have joined the
  # distributed runtime (its preemption notifier is up) and before the
  # first step compiles: the notice arrives while the steps are still to
  # run, however fast they then are.
  deadline = time.time() + 300
  while "\nsteps: " not in os.pread(processes[0][1].fileno(), 1 << 20, 0).decode():
    assert all(p.poll() is None for p, _ in processes) and time.time() < deadline, \
        finish(processes)[1]
    time.sleep(0.05)
  processes[1][0].send_signal(signal.SIGTERM)  # One host only, as a spot VM's notice.
  codes, outputs = finish(processes)
  assert codes == [143, 143], [o[-3000:] for o in outputs]
  stopped = next(l for l in outputs[0].splitlines() if l.startswith("stopped at step"))
  step = int(stopped.split()[3])
  assert LOG <= step < TOTAL and step % LOG == 0 and "(preempted)" in stopped
  assert checkpointing.read_state_tree(workdir)[0] == step  # Both hosts saved it.
  resumed = run_to_end(workdir, *streamed_flags(data), **cache)
  assert f"resuming at step {step}" in resumed[0] and "done: top-1" in resumed[0]
  # Only process 0 talks and writes; process 1 trains silently.
  assert quiet_libraries_only(resumed[1]) == "", resumed[1][-3000:]
  summary = json.loads(read(f"{workdir}/summary.json"))
  assert summary["environment"]["process_count"] == 2
  assert summary["environment"]["device_count"] == 4
  assert one["environment"]["device_count"] == 1
  # The rerun loaded from the run's cache what the stopped run had compiled
  # and compiled what that run never reached, the evaluation's programs
  # among them (measured: 77 loaded, 10 compiled). test_cli_runs.py has a
  # rerun that compiles nothing.
  counters = summary["compilation_cache"]
  assert counters["dir"] == cache["JAX_COMPILATION_CACHE_DIR"]
  assert 0 < counters["compiled"] < counters["loaded"]
  assert summary["data_source"] == f"lists:{data} images:{data}"
  # One line per log interval and evaluation: appended, never duplicated.
  logged = records(f"{workdir}/train_metrics.jsonl")
  assert [r["step"] for r in logged] == [*range(LOG, TOTAL, LOG), TOTAL]
  assert [r["step"] for r in records(f"{workdir}/metrics.jsonl")] == [TOTAL]
  # Each host holds rows 0-3 and 8-11 of a batch of 16: fed the wrong rows,
  # the losses differ (the evaluation, gathered wrongly, counts images twice
  # or scores them against other labels).
  reference = {r["step"]: r for r in records(tmp_path / "one_device" / "train_metrics.jsonl")}
  assert sorted(reference) == [r["step"] for r in logged]
  for record in logged:
    for key in LOGGED:
      np.testing.assert_allclose(record[key], reference[record["step"]][key], rtol=1e-5,
                                 err_msg=f"{key} at step {record['step']}")
  test_lines = (fake_lists / "ImageNet_LT_test.txt").read_text().splitlines()
  assert summary["num_test_images"] == one["num_test_images"] == len(test_lines) == (
      FAKE_CLASSES * 5)
  for key in ("top1", "mean_class_acc", "ece"):  # An image's worth (1/60).
    assert abs(summary["final"][key] - one["final"][key]) <= 1 / 60, key
  np.testing.assert_allclose(summary["final"]["nll"], one["final"]["nll"], rtol=1e-4)
  assert read(f"{workdir}/report.md").startswith("# ")  # The report on gs://.
  # `lt_calib.evaluate` in this process (its command line: test_evaluate.py).
  evaluate.evaluate_workdir(workdir, test_rhos=[1.0, 0.1], val_per_class=2)
  result = json.loads(read(f"{workdir}/evaluation.json"))
  # The final checkpoint, which the rerun wrote after this process had
  # listed the preempted run's (read_state_tree above).
  assert result["checkpoint_step"] == TOTAL
  assert result["num_test_images"] == FAKE_CLASSES * 5
  assert result["summary"]["top1"] == pytest.approx(summary["final"]["top1"], abs=1e-9)
  assert result["temperature"]["val_count_per_class"] == [2] * FAKE_CLASSES
  assert read(f"{workdir}/label_shift.csv").startswith("method,test_rho")
