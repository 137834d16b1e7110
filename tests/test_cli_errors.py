"""Bad input to the real CLI ends in one line `error: ...` and exit status 2.

Each case runs `python -m lt_calib.main` as a user would. The errors fire
before anything is compiled (most before any data is read), so a case costs
about one interpreter start with JAX imported; the cases of this module run
on a few processes at once (see `cli_results`).
"""

import concurrent.futures
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lt_calib import cli, config_checks, errors
from tests.helpers import tiny_config
from tests.test_datasets import write_npz

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOKE = "--config=configs/cifar10_lt.py:smoke"


def _write_bad_npz_files(folder: pathlib.Path) -> None:
  """The broken data files of the cases below, each named after its fault."""
  valid = folder / "valid.npz"
  write_npz(valid, train_labels=list(range(10)) * 2, test_labels=list(range(10)))
  data = valid.read_bytes()
  garbage = np.random.RandomState(0).bytes(4096)
  assert not garbage.startswith(b"PK")  # A zip header would make it a zip.
  (folder / "garbage.npz").write_bytes(garbage)
  (folder / "truncated.npz").write_bytes(data[:len(data) // 2])
  objects = np.array([b"\xff\xd8", None], dtype=object)
  np.savez(folder / "pickled.npz", train_jpeg=objects, train_offsets=objects,
           train_labels=objects, test_jpeg=objects, test_offsets=objects,
           test_labels=objects)
  # CIFAR-10 has classes 0..9; 12 belongs to no class.
  write_npz(folder / "bad_labels.npz", train_labels=[0, 1, 12], test_labels=[0, 1])
  (folder / "a_file").write_text("not a folder\n")
  (folder / "raises.py").write_text("def get_config(arg=''):\n  return {}['lr']\n")


# name -> (command-line arguments, strings the error line must contain). The
# arguments may hold {tmp}, the folder of `_write_bad_npz_files`; --workdir
# is added unless given. The strings are the field or path the user must fix.
CASES = {
    "rho_zero": ([SMOKE, "--config.dataset.imbalance_ratio=0"],
                 ["dataset.imbalance_ratio"]),
    "alpha_negative": ([SMOKE, "--config.mix.alpha=-1"], ["mix.alpha"]),
    "unknown_mix": ([SMOKE, "--config.mix.name=cutmix"], ["mix.name", "cutmix"]),
    "unknown_loss": ([SMOKE, "--config.loss.name=hinge"], ["loss.name", "hinge"]),
    "unknown_dataset": ([SMOKE, "--config.dataset.name=svhn"], ["dataset.name", "svhn"]),
    "batch_size_zero": ([SMOKE, "--config.batch_size=0"], ["batch_size"]),
    "epochs_negative": ([SMOKE, "--config.num_epochs=-1"], ["num_epochs"]),
    "learning_rate_nan": ([SMOKE, "--config.optim.learning_rate=nan"],
                          ["optim.learning_rate", "nan"]),
    "tau_nan": ([SMOKE, "--config.mix.tau=nan"], ["mix.tau", "nan"]),
    "missing_config_file": (["--config=configs/nope.py"], ["configs/nope.py"]),
    "missing_npz": ([SMOKE, "--config.dataset.data_file=/nonexistent.npz"],
                    ["dataset.data_file", "/nonexistent.npz"]),
    "garbage_npz": ([SMOKE, "--config.dataset.data_file={tmp}/garbage.npz"],
                    ["garbage.npz", "not an .npz archive"]),
    "truncated_npz": ([SMOKE, "--config.dataset.data_file={tmp}/truncated.npz"],
                      ["truncated.npz", "truncated or corrupt"]),
    "pickled_npz": ([SMOKE, "--config.dataset.data_file={tmp}/pickled.npz"],
                    ["pickled.npz", "pickled (object) data"]),
    "bad_labels_npz": ([SMOKE, "--config.dataset.data_file={tmp}/bad_labels.npz"],
                       ["bad_labels.npz", "outside [0, 10)"]),
    "workdir_is_a_file": ([SMOKE, "--workdir={tmp}/a_file"], ["a_file"]),
    "test_prior_wrong_length": ([SMOKE, "--config.loss.test_prior=0.5,0.5"],
                                ["loss.test_prior", "10"]),
    # Command lines that absl / ml_collections reject while parsing flags.
    "override_of_missing_field": ([SMOKE, "--config.optim.learning_rat=0.1"],
                                  ["--config.optim.learning_rat"]),
    "override_of_wrong_type": ([SMOKE, "--config.batch_size=many"],
                               ["--config.batch_size", "many"]),
    "config_file_raises": (["--config={tmp}/raises.py"], ["raises.py", "KeyError"]),
}


def _run_case(name: str, tmp: pathlib.Path) -> subprocess.CompletedProcess:
  args, _ = CASES[name]
  args = [a.format(tmp=tmp) for a in args]
  if not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={tmp / ('workdir_' + name)}")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "lt_calib.main", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_result(request, tmp_path_factory):
  """case name -> its finished process; the cases run one per core at a time.

  Each process mostly imports JAX; running them side by side uses both cores
  of a CI machine, so every case selected in this module starts at once and
  a test waits only for its own. Under pytest-xdist each worker runs only
  the cases it is given (its session lists every test, not just its own).
  """
  tmp = tmp_path_factory.mktemp("cli_errors")
  _write_bad_npz_files(tmp)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1))
  futures = {}

  def start(name):
    if name not in futures:
      futures[name] = pool.submit(_run_case, name, tmp)
    return futures[name]

  if not os.environ.get("PYTEST_XDIST_WORKER"):
    for item in request.session.items:
      callspec = getattr(item, "callspec", None)
      if item.module is request.module and callspec and "case" in callspec.params:
        start(callspec.params["case"])
  yield lambda name: start(name).result()
  pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_exit_status_2(case, cli_result):
  result = cli_result(case)
  output = result.stdout + result.stderr
  assert result.returncode == 2, output
  assert "Traceback" not in output, output
  lines = [line for line in output.splitlines() if line.strip()]
  assert lines and lines[-1] == result.stderr.splitlines()[-1], output
  assert lines[-1].startswith("error: "), output
  assert len(lines) <= 3, output  # The error line, and room for a stray warning.
  for needle in CASES[case][1]:
    assert needle in lines[-1], (needle, output)


def test_a_bug_keeps_its_traceback():
  # Not a UserError: the traceback is what a bug report needs.
  code = ("from lt_calib import cli\n"
          "def main(argv):\n  raise RuntimeError('a bug')\n"
          "cli.run(main)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


def test_check_workdir(tmp_path):
  cli.check_workdir(str(tmp_path))  # An existing folder.
  cli.check_workdir(str(tmp_path / "new" / "run"))  # Created later.
  cli.check_workdir("gs://no-such-bucket/run")  # Remote: not checked locally.
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(errors.WorkdirError, match="afile is an existing file"):
    cli.check_workdir(str(afile))
  with pytest.raises(errors.WorkdirError, match="afile is a file"):
    cli.check_workdir(str(afile / "run"))
  with pytest.raises(errors.WorkdirError, match="empty"):
    cli.check_workdir("")


@pytest.mark.parametrize("field,value,message", [
    # NaN fails every comparison, so it gets its own words.
    ("optim__momentum", float("nan"),
     r"optim.momentum must be a finite number in \[0, 1\), got nan"),
    ("dataset__imbalance_ratio", float("inf"), "imbalance_ratio must be a finite number"),
    ("loss__la_tau", float("nan"), "loss.la_tau must be a finite number"),
    ("optim__decay_factors", (0.0,), r"optim.decay_factors\[0\] must be > 0"),
    ("loss__test_prior", "1,-2,3,1,1,1,1,1,1,1",
     r"positive finite weights, but .* has \[-2.0\]"),
    ("loss__test_prior", "a,b", "comma-separated numbers"),
    ("model__depth", 10, "model.depth must be 6n\\+2"),
    ("dataset__num_classes", 100, "num_classes=100 disagrees"),
])
def test_config_checks_name_the_field(field, value, message):
  overrides = {field: value}
  if field == "optim__decay_factors":
    overrides["optim__decay_epochs"] = (1,)
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.check_config(tiny_config(**overrides))
