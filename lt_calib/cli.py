"""Runs a command-line entry point: user errors end in one line, not a traceback.

`run(main)` replaces `absl.app.run(main)` in `lt_calib.main`, `evaluate`,
`grid` and `check`. Two kinds of failure are the user's to fix and end with
one line `error: <message>` on stderr and exit status 2:

- an `errors.UserError` escaping `main` (a config value out of range, a
  missing or broken data file, an unusable workdir);
- a command line that does not parse: an unknown or malformed flag, a config
  file that is missing or raises, an override of a field the config lacks or
  of the wrong type. absl and ml_collections report these while parsing
  flags (some only when the config is first read), so `parse_flags` handles
  them before `main` runs.

Anything else is a bug and keeps its traceback.
"""

import os
import pathlib
import re
import sys
import traceback
from typing import Callable, List, NoReturn, Optional

from absl import app
from absl import flags
from absl import logging as absl_logging
# The implementation module: the package does not re-export is_config_flag.
from ml_collections.config_flags import config_flags as ml_config_flags

from lt_calib import storage
from lt_calib.errors import UserError, WorkdirError

EXIT_USER_ERROR = 2
FLAGS = flags.FLAGS


def one_line(text: str) -> str:
  """`text` with its line breaks and runs of spaces folded into single spaces."""
  return " ".join(str(text).split())


def exit_with_error(message: str) -> NoReturn:
  """Prints `error: <message>` as one line on stderr and exits with status 2."""
  sys.stdout.flush()
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def _config_flag_names() -> List[str]:
  """Names of the flags whose value is a config file (DEFINE_config_file)."""
  return [name for name in FLAGS if ml_config_flags.is_config_flag(FLAGS[name])
          and name == FLAGS[name].name
          and isinstance(FLAGS[name].parser, ml_config_flags.ConfigFileFlagParser)]


def _flag_values_in(argv: List[str], name: str) -> List[str]:
  """Values given to --name in argv, as `--name=VALUE` or `--name VALUE`."""
  values = []
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
    if match and match.group(1) is not None:
      values.append(match.group(2))
    elif match and i + 1 < len(argv):
      values.append(argv[i + 1])
  return values


def _config_file_problem(argv: List[str]) -> Optional[str]:
  """Names a config file of the command line that does not exist, if any."""
  for name in _config_flag_names():
    for value in _flag_values_in(argv, name):
      path = value.split(":", 1)[0]
      if not path:
        return f"--{name} is empty; give a config file, e.g. configs/cifar10_lt.py:smoke."
      if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        return (f"--{name}={value}: config file {path} does not exist{where}; "
                "give the path of a config file, e.g. configs/cifar10_lt.py:smoke.")
      if not os.path.isfile(path):
        return (f"--{name}={value}: {path} is not a file; give the path of a "
                "config file, e.g. configs/cifar10_lt.py:smoke.")
  return None


def _root_cause(error: BaseException) -> BaseException:
  """The first exception of a chain: what ml_collections wrapped and re-raised."""
  seen = {id(error)}
  while True:
    cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if cause is None or id(cause) in seen:
      return error
    seen.add(id(cause))
    error = cause


def _raised_in_config_file(error: BaseException, argv: List[str]) -> Optional[str]:
  """'file:line' where a config file's code raised `error`, else None."""
  files = {os.path.realpath(v.split(":", 1)[0])
           for name in _config_flag_names() for v in _flag_values_in(argv, name)}
  if isinstance(error, SyntaxError) and error.filename:
    if os.path.realpath(error.filename) in files:
      return f"{error.filename}:{error.lineno}"
  frames = traceback.extract_tb(error.__traceback__)
  if not any(os.path.realpath(f.filename) in files for f in frames):
    return None
  # The innermost frame: the line that raised, maybe in a module the config
  # file imports (configs/common.py for a variant).
  last = frames[-1]
  shown = os.path.relpath(last.filename)
  return f"{last.filename if shown.startswith('..') else shown}:{last.lineno}"


def flag_error_message(error: BaseException, argv: List[str]) -> str:
  """One line saying what is wrong with the command line that raised `error`.

  Args:
    error: what flag parsing raised.
    argv: the command line.

  Returns:
    The message, without the 'error: ' prefix.
  """
  problem = _config_file_problem(argv)
  if problem:
    return problem
  root = _root_cause(error)
  where = _raised_in_config_file(root, argv)
  if where:
    files = ", ".join(f"--{n}={v}" for n in _config_flag_names()
                      for v in _flag_values_in(argv, n))
    # A SyntaxError's str() repeats the place; its msg is the reason alone.
    reason = root.msg if isinstance(root, SyntaxError) else root
    return (f"{files}: the config file raised {type(root).__name__}: "
            f"{one_line(reason)} (at {where}).")
  if isinstance(root, (AttributeError, KeyError)):
    # ml_collections looks every --config.a.b override up in the config and
    # raises a bare KeyError('b') when one is missing.
    field = str(root.args[0]).strip("'\"") if root.args else ""
    overrides = [arg.split("=", 1)[0] for arg in argv
                 if re.match(r"--?\w+\.", arg) and
                 field in arg.split("=", 1)[0].split(".")[1:]]
    if overrides:
      return (f"{overrides[-1]}: the config has no field {field!r}; check the "
              "spelling against the config file.")
  if isinstance(error, flags.Error):
    return one_line(error)
  return f"cannot parse the command line: {type(root).__name__}: {one_line(root)}"


def parse_flags(argv: List[str]) -> List[str]:
  """absl's flag parser, with user errors as one line and exit status 2.

  Args:
    argv: the command line, program name first.

  Returns:
    The arguments left after the flags, program name first.
  """
  try:
    remaining = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # Only the command line and the config files it names run here, so every
    # failure is the user's to fix.
    exit_with_error(flag_error_message(e, argv))
  # ml_collections defers a config file that failed to load (missing, a
  # folder) to the first use of the config, which then raises the load
  # error; use it once now and report that instead.
  for name in _config_flag_names():
    try:
      FLAGS[name].value.keys()
    except Exception as e:  # pylint: disable=broad-except
      problem = _config_file_problem(argv)
      exit_with_error(problem or
                      f"--{name}: cannot load the config file: {one_line(_root_cause(e))}")
  return remaining


def check_workdir(path: str) -> None:
  """Raises WorkdirError if a local `path` cannot be (or become) a folder.

  Remote workdirs (gs://bucket/..., any 'scheme://') are left to the writer:
  os.path knows nothing of them.

  Args:
    path: the --workdir value.
  """
  if not path:
    raise WorkdirError("--workdir is empty; give the folder for checkpoints and results.")
  if storage.is_remote(path):
    return
  workdir = pathlib.Path(path).expanduser()
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir={path} is an existing file, not a folder; give a "
                       "new or existing folder.")
  for parent in workdir.parents:
    if parent.exists():
      if not parent.is_dir():
        raise WorkdirError(f"--workdir={path} cannot be created: {parent} is a file, "
                           "not a folder.")
      break


def quiet_libraries() -> None:
  """Keeps library INFO logs (Orbax, JAX) off the console unless --verbosity asks.

  The entry points print what a user needs themselves; --verbosity=0 (INFO)
  or higher brings the libraries' logs back.
  """
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def run(main: Callable[[List[str]], Optional[int]]) -> None:
  """`absl.app.run(main)`, with user errors as one line and exit status 2.

  Args:
    main: the entry point's main(argv).
  """

  def main_reporting_user_errors(argv):
    try:
      return main(argv)
    except UserError as e:
      exit_with_error(str(e))

  app.run(main_reporting_user_errors, flags_parser=parse_flags)
