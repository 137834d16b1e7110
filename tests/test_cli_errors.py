"""Bad input to the real CLI ends in one line `error: ...` and exit status 2.

The errors fire before anything is compiled (most before any data is read),
so a case costs little more than its imports: all cases run in children
forked from one process that imported the trainer once
(tests/drivers/cli_error_cases.py), and three of them also as
`python -m lt_calib.main`, as a user would.
"""

import json
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


def _case_args(name: str, tmp: pathlib.Path) -> list:
  args = [a.format(tmp=tmp) for a in CASES[name][0]]
  if not any(a.startswith("--workdir=") for a in args):
    args.append(f"--workdir={tmp / ('workdir_' + name)}")
  return args


def _run_process(args: list) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "lt_calib.main", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli_errors")
  _write_bad_npz_files(tmp)
  return tmp


@pytest.fixture(scope="module")
def cli_results(bad_inputs):
  """case name -> {returncode, stdout, stderr}: every case, forked from one process.

  tests/drivers/cli_error_cases.py imports the trainer once and forks a
  child per case that runs `lt_calib.main` as its own process would;
  `test_real_processes_end_the_same_way` checks that a real
  `python -m lt_calib.main` ends as its driver case did.
  """
  cases = {name: _case_args(name, bad_inputs) for name in CASES}
  (bad_inputs / "cases.json").write_text(json.dumps(cases))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  driver = subprocess.run([sys.executable, "-m", "tests.drivers.cli_error_cases",
                           str(bad_inputs / "cases.json"), str(bad_inputs / "results.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert driver.returncode == 0, driver.stderr[-3000:]
  return json.loads((bad_inputs / "results.json").read_text())


def assert_one_error_line(returncode: int, stdout: str, stderr: str, needles) -> str:
  output = stdout + stderr
  assert returncode == 2, output
  assert "Traceback" not in output, output
  lines = [line for line in output.splitlines() if line.strip()]
  assert lines and lines[-1] == stderr.splitlines()[-1], output
  assert lines[-1].startswith("error: "), output
  assert len(lines) <= 3, output  # The error line, and room for a stray warning.
  for needle in needles:
    assert needle in lines[-1], (needle, output)
  return lines[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_exit_status_2(case, cli_results):
  result = cli_results[case]
  assert_one_error_line(result["returncode"], result["stdout"], result["stderr"],
                        CASES[case][1])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown_mix", "garbage_npz", "override_of_missing_field"])
def test_real_processes_end_the_same_way(case, bad_inputs, cli_results):
  # A config check, a data file, a flag the parser rejects: as a user runs them.
  result = _run_process(_case_args(case, bad_inputs))
  line = assert_one_error_line(result.returncode, result.stdout, result.stderr,
                               CASES[case][1])
  assert line == cli_results[case]["stderr"].splitlines()[-1]


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
