"""Launch scripts (launch/): dry-run plans for a v4-32 slice and for multi-node GPUs.

The TPU scripts are checked through `--dry-run`, which prints every gcloud
command instead of running it (no gcloud here). The parts that run on the
machines themselves (launch/tpu_worker.sh, the ssh launcher of
gpu_multinode.sh) are run for real against a fake trainer and a fake ssh
that runs the remote command locally. Shell only: the file takes seconds.
"""

import os
import pathlib
import shlex
import stat
import subprocess
import textwrap
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
NAME, PROJECT, ZONE, BUCKET = "lt-test", "my-project", "us-central2-b", "my-bucket"
# Cloud TPU's naming: v4-32 counts TensorCores, 2 per chip, so 16 chips, and
# a v4 host holds 4 chips: 4 hosts (workers 0..3).
V4_32_WORKERS = 32 // 2 // 4
WORKDIR = f"gs://{BUCKET}/runs/imagenet_lt"
# Where the streamed ImageNet-LT data lies for every worker of a slice.
DATA = [f"--config.dataset.split_dir=gs://{BUCKET}/imagenet_lt/lists",
        f"--config.dataset.image_root=gs://{BUCKET}/imagenet"]
SCOPE = ["--project", PROJECT, "--zone", ZONE, "--name", NAME]


def run_script(script, *args, env=None, check=True):
  result = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
  if check:
    assert result.returncode == 0, result.stderr
  return result


def commands(output):
  """The printed command lines (not `#` notes), each split into words."""
  return [shlex.split(line) for line in output.splitlines()
          if line.strip() and not line.startswith("#")]


def is_ssh(words, worker):
  return (words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and NAME in words
          and f"--worker={worker}" in words)


def remote_command(words):
  return words[words.index("--command") + 1]


def first(cmds, predicate, start=0):
  for i in range(start, len(cmds)):
    if predicate(cmds[i]):
      return i
  raise AssertionError("no such command")


@pytest.fixture(scope="module")
def tpu_plan():
  """create -> setup -> train, as a user runs them for a v4-32 slice."""
  create = run_script("tpu_create.sh", "--dry-run", *SCOPE, "--accelerator-type=v4-32",
                      "--spot").stdout
  setup = run_script("tpu_setup.sh", "--dry-run", *SCOPE).stdout
  train = run_script("tpu_train.sh", "--dry-run", *SCOPE, "--accelerator-type", "v4-32",
                     "--bucket", BUCKET, "--config", "configs/imagenet_lt.py",
                     "--", "--config.model.depth=50", *DATA).stdout
  return create, setup, train


def test_dry_run_prints_valid_shell(tpu_plan):
  for output in tpu_plan:
    assert subprocess.run(["bash", "-n"], input=output, text=True).returncode == 0


def test_create_setup_train_sequence(tpu_plan):
  cmds = commands("\n".join(tpu_plan))
  created = first(cmds, lambda w: w[:5] == ["gcloud", "compute", "tpus", "queued-resources",
                                            "create"])
  create = cmds[created]
  assert create[5] == NAME and f"--node-id={NAME}" in create
  assert "--accelerator-type=v4-32" in create and "--spot" in create
  assert f"--zone={ZONE}" in create and f"--project={PROJECT}" in create
  assert any(w.startswith("--runtime-version=") for w in create)
  # Then it waits for ACTIVE.
  waited = first(cmds, lambda w: "describe" in w and "--format=value(state.state)" in w, created)
  copied = first(cmds, lambda w: w[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"], waited)
  assert "--worker=all" in cmds[copied]
  installed = first(cmds, lambda w: is_ssh(w, "all") and "pip install" in remote_command(w),
                    copied)
  assert "-e '.[tfds,gcs]' 'jax[tpu]'" in remote_command(cmds[installed])
  started = first(cmds, lambda w: is_ssh(w, "all") and " start " in remote_command(w), installed)
  trainer = shlex.split(remote_command(cmds[started]))
  trainer = trainer[trainer.index("--") + 1:]
  assert trainer == ["--config=configs/imagenet_lt.py", f"--workdir={WORKDIR}",
                     "--distributed=on", "--config.model.depth=50", *DATA]
  # Worker 0's log is followed; then the finish check names summary.json.
  streamed = first(cmds, lambda w: is_ssh(w, 0) and " stream " in remote_command(w), started)
  first(cmds, lambda w: w[:3] == ["gcloud", "storage", "ls"]
        and w[3] == f"{WORKDIR}/summary.json", streamed)


def test_train_names_every_worker(tpu_plan):
  train = tpu_plan[2]
  assert f"# v4-32 slice {NAME}: {V4_32_WORKERS} workers" in train
  for words in commands(train):
    if words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
      command = remote_command(words)
      # Starting, waiting and log tails reach every worker at once.
      if any(f" {step} " in command for step in ("start", "wait", "tail")):
        assert "--worker=all" in words, words


def test_resubmit_after_preemption(tpu_plan):
  # The dry run plays a run preempted once: attempt 2 finds the slice
  # SUSPENDED, deletes and recreates it, sets it up, starts the same command.
  train = tpu_plan[2]
  cmds = commands(train)
  starts = [i for i, w in enumerate(cmds) if is_ssh(w, "all") and " start " in remote_command(w)]
  assert len(starts) == 2
  same = [remote_command(cmds[i]).split(" --python ")[1] for i in starts]
  assert same[0] == same[1]
  between = cmds[starts[0]:starts[1]]
  checks = [w for w in between if w[:3] == ["gcloud", "storage", "ls"]]
  assert checks == [["gcloud", "storage", "ls", f"{WORKDIR}/summary.json"]]
  verbs = [w[4] for w in between if w[:4] == ["gcloud", "compute", "tpus", "queued-resources"]]
  assert verbs.index("delete") < verbs.index("create")
  assert any(is_ssh(w, "all") and "pip install" in remote_command(w) for w in between)
  assert "# attempt 2 of 10" in train and "SUSPENDED" in train
  assert train.rstrip().endswith(f"# finished: {WORKDIR}/summary.json")


@pytest.mark.parametrize("state,verbs", [
    ("MISSING", ["describe", "create", "describe"]),
    ("ACTIVE", ["describe"]),
    ("WAITING_FOR_RESOURCES", ["describe", "describe"]),
    ("SUSPENDED", ["describe", "delete", "create", "describe"]),
    ("FAILED", ["describe", "delete", "create", "describe"]),
])
def test_create_is_safe_to_rerun(state, verbs):
  out = run_script("tpu_create.sh", "--dry-run", *SCOPE, "--dry-run-state", state).stdout
  assert [w[4] for w in commands(out)] == verbs


@pytest.mark.parametrize("accelerator,hosts", [
    # Cloud TPU docs: v4/v5p/v2/v3 names count TensorCores (8 per host),
    # v5e/v6e names count chips (4 per host; 8-chip slices are one host).
    ("v4-8", 1), ("v4-32", 4), ("v4-128", 16), ("v5p-32", 4), ("v2-32", 4),
    ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-64", 16)])
def test_workers_of_accelerator_types(accelerator, hosts):
  out = run_script("tpu_train.sh", "--dry-run", *SCOPE, "--bucket", BUCKET,
                   "--accelerator-type", accelerator, "--max-attempts=1", "--", *DATA,
                   check=False).stdout
  assert f"# {accelerator} slice {NAME}: {hosts} workers" in out


@pytest.mark.parametrize("bucket", [f"gs://{BUCKET}", f"gs://{BUCKET}/", BUCKET])
def test_bucket_with_or_without_scheme(bucket):
  out = run_script("tpu_train.sh", "--dry-run", *SCOPE, "--bucket", bucket,
                   "--max-attempts=1", "--", *DATA, check=False).stdout
  assert f"--workdir={WORKDIR} " in out
  assert "gs://gs://" not in out and f"{BUCKET}//" not in out


def test_setup_from_git():
  out = run_script("tpu_setup.sh", "--dry-run", *SCOPE, "--source=git",
                   "--git-url=https://example.org/lt_calib.git", "--git-ref=v1").stdout
  install = remote_command(commands(out)[0])
  assert "git clone --quiet https://example.org/lt_calib.git ~/lt_calib" in install
  assert "checkout --quiet v1" in install


@pytest.mark.parametrize("script", ["tpu_create.sh", "tpu_setup.sh", "tpu_train.sh",
                                    "gpu_multinode.sh"])
def test_help_and_flag_errors(script):
  help_text = run_script(script, "--help").stdout
  assert "--dry-run" in help_text and "Usage: launch/" + script in help_text
  bad = run_script(script, "--no-such-flag", check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip() == f"{script}: error: unknown flag --no-such-flag " + (
      "(see --help; trainer flags go after --)." if script in ("tpu_train.sh", "gpu_multinode.sh")
      else "(see --help).")


def test_train_needs_a_gcs_workdir():
  bad = run_script("tpu_train.sh", "--dry-run", "--workdir=/tmp/run", check=False)
  assert bad.returncode == 2 and "must be gs://" in bad.stderr


@pytest.mark.parametrize("config, flags, missing", [
    ("configs/imagenet_lt.py", [], ["dataset.split_dir", "dataset.image_root"]),
    ("configs/imagenet_lt.py:resnet50", [DATA[0]], ["dataset.image_root"]),
    ("configs/inat2018.py", ["--config.dataset.image_root=/mnt/inat", DATA[0]],
     ["dataset.image_root"]),
    ("configs/imagenet_lt.py", ["--config.dataset.source=tfds", DATA[0]],
     ["dataset.tfds_data_dir"]),
    ("configs/cifar10_lt.py", ["--config.dataset.name=image_list", DATA[1]],
     ["dataset.split_dir"]),
])
def test_train_refuses_streamed_data_the_workers_cannot_read(config, flags, missing):
  bad = run_script("tpu_train.sh", "--dry-run", "--bucket", BUCKET, "--config", config,
                   "--", *flags, check=False)
  assert bad.returncode == 2 and bad.stdout == ""  # Before any gcloud command.
  assert all(f"--config.{field}=gs://..." in bad.stderr for field in missing), bad.stderr
  assert "(got /mnt/inat)" in bad.stderr or "inat2018" not in config


def test_train_accepts_in_memory_data_and_streamed_data_on_gcs():
  for config, flags in [("configs/cifar10_lt.py", []),
                        ("configs/imagenet_lt.py", DATA),
                        ("configs/imagenet_lt.py", ["--config.dataset.source=tfds", DATA[0],
                                                    f"--config.dataset.tfds_data_dir=gs://{BUCKET}/tfds"])]:
    out = run_script("tpu_train.sh", "--dry-run", "--bucket", BUCKET, "--config", config,
                     "--max-attempts=1", "--", *flags, check=False)
    assert "gcloud compute tpus tpu-vm ssh" in out.stdout, out.stderr


# ---------------------------------------------------------------------------
# Multi-node GPU recipe.


def test_gpu_ssh_plan_one_process_per_node():
  hosts = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]
  out = run_script("gpu_multinode.sh", "--dry-run", "--hosts", ",".join(hosts),
                   "--port=2345", "--workdir=/shared/run", "--", "--config.seed=3").stdout
  assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
  launches = [w for w in commands(out) if w[0] == "ssh" and "lt_calib.main" in w[-1]]
  assert [w[1] for w in launches] == hosts
  seen = []
  for host, words in zip(hosts, launches):
    trainer = shlex.split(words[-1].split("exec ", 1)[1])
    assert "--coordinator_address=gpu-a:2345" in trainer
    assert "--num_processes=4" in trainer and "--workdir=/shared/run" in trainer
    assert trainer[-1] == "--config.seed=3"
    seen += [int(w.split("=")[1]) for w in trainer if w.startswith("--process_id=")]
  assert seen == [0, 1, 2, 3]


def test_gpu_slurm_plan():
  out = run_script("gpu_multinode.sh", "--dry-run", "--launcher=slurm", "--nnodes=4",
                   "--workdir=gs://b/run").stdout
  (srun,) = [w for w in commands(out) if w[0] == "srun"]
  assert "--nodes=4" in srun and "--ntasks-per-node=1" in srun
  task = srun[srun.index("-c") + 1]
  assert "--process_id=$SLURM_PROCID" in task and "--num_processes=4" in task
  assert "--coordinator_address=node0:12355" in task
  ranks = [line for line in out.splitlines() if line.startswith("# rank ")]
  assert [line.split("--process_id=")[1].split()[0] for line in ranks] == ["0", "1", "2", "3"]


def write_executable(path, text):
  path.write_text(textwrap.dedent(text))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


@pytest.fixture
def fake_cluster(tmp_path):
  """A bin/ with an `ssh` that runs the remote command here, and a fake trainer.

  The trainer records each start of each rank; rank 0 writes summary.json
  on its FAKE_FINISH_AT-th start, earlier starts exit 143 as on preemption.
  """
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_executable(bin_dir / "ssh", """\
      #!/usr/bin/env bash
      while [[ $1 == -* ]]; do shift; done
      shift  # The host.
      exec bash -c "$*"
      """)
  trainer = write_executable(tmp_path / "fake_python", """\
      #!/usr/bin/env bash
      for a in "$@"; do
        case $a in
          --workdir=*) W=${a#*=} ;; --process_id=*) R=${a#*=} ;;
          --num_processes=*) N=${a#*=} ;; --coordinator_address=*) C=${a#*=} ;;
        esac
      done
      mkdir -p "$W"
      n=$(( $(cat "$W/starts_$R" 2>/dev/null || echo 0) + 1 ))
      echo $n > "$W/starts_$R"
      echo "rank $R of $N via $C, start $n"
      if (( n < ${FAKE_FINISH_AT:-1} )); then exit 143; fi
      if [[ $R == 0 ]]; then echo '{}' > "$W/summary.json"; fi
      """)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
  return tmp_path, trainer, env


def test_gpu_ssh_launcher_runs_every_rank_and_resubmits(fake_cluster):
  tmp_path, trainer, env = fake_cluster
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  result = run_script("gpu_multinode.sh", "--hosts=h0,h1,h2", f"--python={trainer}",
                      f"--workdir={workdir}", f"--log-dir={logs}", "--max-attempts=3",
                      "--env", "FAKE_FINISH_AT=2", env=env)
  assert "finished" in result.stderr
  for rank in range(3):
    assert (workdir / f"starts_{rank}").read_text().strip() == "2"
    log = (logs / f"rank{rank}.log").read_text()
    assert log.startswith("remote pid ") and f"rank {rank} of 3 via h0:12355, start 2" in log
  assert (workdir / "summary.json").exists()


def test_gpu_ssh_launcher_gives_up_after_max_attempts(fake_cluster):
  tmp_path, trainer, env = fake_cluster
  result = run_script("gpu_multinode.sh", "--hosts=h0,h1", f"--python={trainer}",
                      f"--workdir={tmp_path / 'run'}", f"--log-dir={tmp_path / 'logs'}",
                      "--max-attempts=2", "--env", "FAKE_FINISH_AT=5", env=env, check=False)
  assert result.returncode == 1
  assert (tmp_path / "run" / "starts_1").read_text().strip() == "2"


# ---------------------------------------------------------------------------
# What runs on each TPU worker.


@pytest.fixture
def worker(tmp_path):
  trainer = write_executable(tmp_path / "fake_python", """\
      #!/usr/bin/env bash
      trap 'echo "checkpointed"; exit 143' TERM
      echo "flags: $*, FOO=${FOO:-}"
      for ((i = 0; i < ${FAKE_TENTHS:-600}; i++)); do sleep 0.1; done
      exit "${FAKE_STATUS:-0}"
      """)
  logs = tmp_path / "logs"

  def call(command, *args, check=True):
    return run_script("tpu_worker.sh", command, "--log-dir", str(logs), *args, check=check)

  yield call, trainer
  # Leaves nothing running, whatever a test did.
  subprocess.run(["bash", str(LAUNCH / "tpu_worker.sh"), "stop", "--log-dir", str(logs),
                  "--minutes", "1"], capture_output=True, timeout=120)


def test_worker_start_keep_stop(worker):
  call, trainer = worker
  start = ["--python", str(trainer), "--env", "FOO=bar", "--", "--config=c.py"]
  assert "started trainer pid" in call("start", *start).stdout
  assert call("alive").returncode == 0
  assert call("status").stdout.strip() == "running"
  # The same flags again (a reattaching tpu_train.sh) keep the run going.
  assert "the same run is still going" in call("start", *start).stdout
  assert "stopping trainer" in call("stop").stdout
  assert call("status").stdout.strip() == "143"
  assert call("stream").stdout.splitlines() == ["flags: -m lt_calib.main --config=c.py, FOO=bar",
                                                "checkpointed"]
  assert call("alive", check=False).returncode == 1


def test_worker_stream_follows_until_exit_and_records_status(worker):
  call, trainer = worker
  call("start", "--python", str(trainer), "--env", "FAKE_TENTHS=10", "--env", "FAKE_STATUS=2",
       "--", "--config=d.py")
  began = time.monotonic()
  out = call("stream").stdout
  assert out.startswith("flags: -m lt_calib.main --config=d.py")
  assert time.monotonic() - began < 30
  for _ in range(50):  # The waiting shell writes the status just after the exit.
    if call("status").stdout.strip() != "running":
      break
    time.sleep(0.1)
  assert call("status").stdout.strip() == "2"
  assert call("tail", "--lines", "1").stdout.startswith("[")


def test_gpu_ssh_launcher_forwards_sigterm_to_every_rank(fake_cluster):
  # A preempted or cancelled launcher asks each rank (by the pid its remote
  # shell printed) to checkpoint and stop, rather than cutting ssh.
  tmp_path, _, env = fake_cluster
  trainer = write_executable(tmp_path / "slow_python", """\
      #!/usr/bin/env bash
      trap 'echo "checkpointed"; exit 143' TERM
      echo "started"
      for ((i = 0; i < 600; i++)); do sleep 0.1; done
      """)
  logs = tmp_path / "logs"
  launcher = subprocess.Popen(
      ["bash", str(LAUNCH / "gpu_multinode.sh"), "--hosts=h0,h1", f"--python={trainer}",
       f"--workdir={tmp_path / 'run'}", f"--log-dir={logs}"],
      env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  def started(rank):
    log = logs / f"rank{rank}.log"
    return log.exists() and "started" in log.read_text()

  try:
    for _ in range(200):
      if started(0) and started(1):
        break
      time.sleep(0.05)
    launcher.terminate()
    assert launcher.wait(timeout=60) == 143
  finally:
    if launcher.poll() is None:
      launcher.kill()
  for rank in range(2):
    assert (logs / f"rank{rank}.log").read_text().splitlines()[-1] == "checkpointed"


def test_gpu_script_under_sbatch_finds_the_checkout(tmp_path):
  # sbatch runs a copy of the script from its spool directory.
  spool = tmp_path / "spool"
  spool.mkdir()
  copy = spool / "slurm_script"
  copy.write_text((LAUNCH / "gpu_multinode.sh").read_text())
  repo = LAUNCH.parent
  result = subprocess.run(["bash", str(copy), "--dry-run", "--launcher=slurm", "--nnodes=2"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SLURM_SUBMIT_DIR": str(repo)})
  assert result.returncode == 0, result.stderr
  (srun,) = [w for w in commands(result.stdout) if w[0] == "srun"]
  assert srun[-1].startswith(f"cd {repo} && ")
