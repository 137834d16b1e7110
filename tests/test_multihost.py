"""Several processes on localhost, as the hosts of a TPU slice: preemption, device order.

Each run is tests/drivers/train_on_mesh.py (`python -m lt_calib.main` on a
mesh it builds) in 2 processes of 2 CPU devices each, joined by JAX's
distributed runtime, on the device order a TPU slice has: p0d0, p1d0,
p0d1, p1d1, so each process holds two separate blocks of rows. In memory it
trains on tests/helpers.py's synthetic dataset (10 steps of 36 images an
epoch, 3 epochs, compiled chunks of 5 steps); streamed, on a generated
12-class image list. The references are runs in this process on one device
(the same global batch and keys, so only the order of float reductions
differs).
"""

import json
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from lt_calib import checkpointing, config_fields, evaluate, storage
from lt_calib import data as data_lib
from lt_calib.train import trainer
from tests.conftest import REPO
from tests.helpers import (FAKE_CLASSES, build_fake_lists, streamed_overrides,
                           synthetic_dataset, tiny_config)
from tests.test_cli_runs import TINY, environment
from tests.test_streaming_train import streamed_config

pytestmark = pytest.mark.slow

# Compiled chunks of 5 steps, a log line every 5 steps, 3 epochs of 10
# (360 images in batches of 36): the host looks in at each epoch's end
# (steps 10, 20, 30), and SIGTERM lands while the devices run a stretch.
# Two chunks make an epoch, so no single-step program is compiled: each
# process compiles its own (JAX's cache keeps only process 0's).
PREEMPTIBLE_OVERRIDES = {"batch_size": 36, "num_epochs": 3, "dataset.crop_padding": 1,
                         "mix.stop_epoch": 2, "steps_per_dispatch": 5, "log_every_steps": 5}
PREEMPTIBLE = [*TINY, *(f"--config.{field}={value}"
                        for field, value in PREEMPTIBLE_OVERRIDES.items()), "--synthetic"]
EPOCH, TOTAL, LOG = 10, 30, 5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, *flags, module="tests.drivers.train_on_mesh", devices=2, processes=2,
          config=None, **env):
  """Starts the processes of one run; returns them, their output in files.

  Files, not pipes: a process whose pipe nobody drains blocks once it is
  full, and the other process then waits for it forever in a collective.
  """
  port = free_port()
  command = [sys.executable, "-m", module, *(config or PREEMPTIBLE), f"--workdir={workdir}",
             *flags]
  if processes > 1:
    command += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
  started = []
  for rank in range(processes):
    out = tempfile.TemporaryFile("w+")
    started.append((subprocess.Popen(
        command + ([f"--process_id={rank}"] if processes > 1 else []), cwd=REPO,
        env=environment(devices, **env), stdout=out, stderr=subprocess.STDOUT, text=True), out))
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
  """A local or gs:// file's text, asked afresh (no cached listing), or None."""
  path = str(path)
  if storage.is_remote(path):
    import fsspec  # pylint: disable=g-import-not-at-top
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return fs.cat(path).decode() if fs.exists(path) else None
  return pathlib.Path(path).read_text() if pathlib.Path(path).exists() else None


def records(path) -> list:
  return [json.loads(l) for l in (read(path) or "").splitlines() if l.strip()]


def first_loss(workdir, step) -> float:
  first = records(f"{workdir}/train_metrics.jsonl")[0]
  assert first["step"] == step
  return first["loss"]


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


# What the Google auth libraries log when they find no credentials, as with
# the emulator (a TPU VM has its service account): gcsfs's google-auth and
# TensorStore's C++ provider, each in the glog format.
NO_CREDENTIALS = re.compile(r"^[WE]\d{4} [\d:.]+ +\d+ (_default\.py|google_auth_provider\.cc)"
                            r":\d+\] .*$", re.MULTILINE)


def quiet_libraries_only(text: str) -> str:
  """A process's output less Gloo's connection messages and the emulator's
  missing-credentials warnings (and digits, whitespace): empty if our code
  printed nothing."""
  return re.sub(r"[\d\s]", "", GLOO.sub("", NO_CREDENTIALS.sub("", text)))


# What the 2-process runs log, per logged step, that must match the run on
# one device: the same global batch and keys, so only the order of float
# reductions differs (measured: at most 3e-7 relative over the 30 steps).
# A resume from the wrong state, data position or key changes them by
# percents, as does a process feeding rows of the other's devices.
LOGGED = ("loss", "grad_norm", "param_norm", "learning_rate")


def test_sigterm_to_one_host_stops_both_and_the_rerun_continues_as_one_device(
    tmp_path, gcs, monkeypatch, no_report, cifar10_file):
  del cifar10_file
  # The reference: the same config in this process, on one device.
  monkeypatch.setattr(data_lib, "load", lambda cfg: synthetic_dataset())
  config = config_fields.set_fields(tiny_config(), PREEMPTIBLE_OVERRIDES.items())
  one = trainer.train_and_evaluate(config, str(tmp_path))
  # The workdir on gs://, as the TPU launcher requires.
  workdir = gcs.folder("preempted")
  processes = start(workdir)
  deadline = time.time() + 300
  while not any(r["step"] >= LOG for r in records(f"{workdir}/train_metrics.jsonl")):
    assert all(p.poll() is None for p, _ in processes) and time.time() < deadline, \
        finish(processes)[1]
    time.sleep(0.1)
  processes[1][0].send_signal(signal.SIGTERM)  # One host only, as a spot VM's notice.
  codes, outputs = finish(processes)
  assert codes == [143, 143], [o[-3000:] for o in outputs]
  stopped = next(l for l in outputs[0].splitlines() if l.startswith("stopped at step"))
  step = int(stopped.split()[3])
  assert EPOCH <= step < TOTAL and step % EPOCH == 0 and "(preempted)" in stopped
  assert checkpointing.read_state_tree(workdir)[0] == step  # Both hosts saved it.
  resumed = run_to_end(workdir)
  assert f"resuming at step {step}" in resumed[0] and "done: top-1" in resumed[0]
  # Only process 0 talks and writes; process 1 trains silently.
  assert quiet_libraries_only(resumed[1]) == "", resumed[1][-3000:]
  summary = json.loads(read(f"{workdir}/summary.json"))
  assert summary["environment"]["process_count"] == 2
  assert summary["environment"]["device_count"] == 4
  assert one["environment"]["device_count"] == 1
  # One line per log interval and evaluation: appended, never duplicated.
  logged = records(f"{workdir}/train_metrics.jsonl")
  assert [r["step"] for r in logged] == sorted(
      set(range(LOG, TOTAL + 1, LOG)) | {EPOCH, 2 * EPOCH, TOTAL})
  assert [r["step"] for r in records(f"{workdir}/metrics.jsonl")] == [EPOCH, 2 * EPOCH, TOTAL]
  # Each host holds rows 0-8 and 18-26 of a batch of 36: fed the wrong rows,
  # the losses differ (the evaluation, gathered wrongly, counts images twice
  # or scores them against other labels).
  reference = {r["step"]: r for r in records(tmp_path / "train_metrics.jsonl")}
  for record in logged:
    for key in LOGGED:
      np.testing.assert_allclose(record[key], reference[record["step"]][key], rtol=1e-5,
                                 err_msg=f"{key} at step {record['step']}")
  assert summary["num_test_images"] == 128 == one["num_test_images"]
  for key in ("top1", "mean_class_acc", "ece"):  # An image's worth (1/128).
    assert abs(summary["final"][key] - one["final"][key]) <= 0.01, key
  np.testing.assert_allclose(summary["final"]["nll"], one["final"]["nll"], rtol=1e-4)
  assert read(f"{workdir}/report.md").startswith("# cifar10")  # The report on gs://.


CLASSES = FAKE_CLASSES


@pytest.fixture(scope="module")
def fake_lists(tmp_path_factory):
  """A 12-class image-list dataset in the ImageNet-LT layout (lt_calib.data.fake)."""
  return build_fake_lists(tmp_path_factory.mktemp("fake_imagenet_lt"))


# One epoch of 5 steps with a log line at step 4, and the ResNet-8 of the
# in-memory runs: what is under test is the streamed input on several hosts
# (the ImageNet ResNet, the second epoch's input and the mixing's stop train
# in test_streaming_train; each would compile another program here).
STREAMED = dict(log_every_steps=4, num_epochs=1, model__name="resnet_cifar", model__depth=8)


def streamed_flags(root) -> list:
  return ["--config=configs/imagenet_lt.py:smoke",
          *(f"--config.{field}={value}"
            for field, value in streamed_overrides(root, **STREAMED).items())]


def test_streamed_run_from_cloud_storage_on_an_interleaved_mesh(tmp_path, fake_lists, gcs):
  """Lists, images and workdir on gs://, 2 hosts interleaved, then evaluate on gs://."""
  import fsspec  # pylint: disable=g-import-not-at-top
  data = gcs.folder("imagenet_lt")
  fsspec.filesystem("gs").put(f"{fake_lists}/", f"{data}/", recursive=True)
  # The reference: this process, one device, to the first logged step (the
  # same global batch and keys; only the order of float reductions differs).
  reference = tmp_path / "one_device"
  trainer.train_and_evaluate(streamed_config(fake_lists, **STREAMED), str(reference),
                             stop_at_step=4)
  workdir = gcs.folder("streamed")
  # A compilation cache of its own, from empty: a cold start, whose counters
  # must say so (test_cli_runs.py has a warm one: nothing compiled). Loaded
  # are only the few small programs the run builds again later (7 of 87
  # here), from what it wrote itself. No other test compiles these programs,
  # so a fresh clone's suite pays nothing for it.
  cache = tmp_path / "cache"
  run_to_end(workdir, "--no_report", config=streamed_flags(data),  # Reports: test above.
             JAX_COMPILATION_CACHE_DIR=str(cache))
  summary = json.loads(read(f"{workdir}/summary.json"))
  assert summary["compilation_cache"]["dir"] == str(cache)
  assert summary["compilation_cache"]["compiled"] > 4 * summary["compilation_cache"]["loaded"]
  test_lines = (fake_lists / "ImageNet_LT_test.txt").read_text().splitlines()
  assert summary["num_test_images"] == len(test_lines) == CLASSES * 5
  assert summary["data_source"] == f"lists:{data} images:{data}"
  np.testing.assert_allclose(first_loss(workdir, 4), first_loss(reference, 4), rtol=1e-5)
  # `lt_calib.evaluate` in this process (its command line: test_evaluate.py).
  evaluate.evaluate_workdir(workdir, test_rhos=[1.0, 0.1], val_per_class=2)
  result = json.loads(read(f"{workdir}/evaluation.json"))
  assert result["num_test_images"] == CLASSES * 5
  assert result["summary"]["top1"] == pytest.approx(summary["final"]["top1"], abs=1e-9)
  assert result["temperature"]["val_count_per_class"] == [2] * CLASSES
  assert read(f"{workdir}/label_shift.csv").startswith("method,test_rho")
