"""Runs many `lt_calib.main` command lines, each in a process forked from one parent.

  python -m tests.drivers.cli_error_cases CASES.json RESULTS.json

CASES.json maps a case name to its command-line arguments. The parent
imports the trainer's modules once (JAX, Flax, Orbax: most of a process's
start-up), then forks one child per case; the child parses its command line
from scratch and runs `lt_calib.main` under `cli.run`, exactly as
`python -m lt_calib.main` does, with its stdout and stderr (file
descriptors 1 and 2) going to files. Each case's output and exit status go
into RESULTS.json. Nothing in the parent initialises a JAX backend, so the
children start from a clean runtime.
"""

import json
import os
import sys
import tempfile

from lt_calib import main as main_module
from lt_calib.train import trainer  # pylint: disable=unused-import  # Imported once, here.


def run_case(args: list) -> dict:
  with tempfile.TemporaryDirectory() as folder:
    paths = [os.path.join(folder, name) for name in ("stdout", "stderr")]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # The child: a fresh command line, outputs to the files.
      code = 1
      try:
        for fd, path in zip((1, 2), paths):
          os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["lt_calib.main", *args]
        main_module.cli.run(main_module.main)
        code = 0
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access  # No parent clean-up.
    _, status = os.waitpid(pid, 0)
    outputs = [open(path).read() for path in paths]
  return {"returncode": os.waitstatus_to_exitcode(status), "stdout": outputs[0],
          "stderr": outputs[1]}


def main() -> None:
  cases_file, results_file = sys.argv[1:3]
  with open(cases_file) as f:
    cases = json.load(f)
  results = {name: run_case(args) for name, args in cases.items()}
  with open(results_file, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
