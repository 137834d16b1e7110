"""Errors that a user can fix without reading code.

A `UserError` says what is wrong with the user's input (a config value, a
data file, a workdir) and how to fix it, in one line. The command-line entry
points print its message without a traceback and exit with status 2;
anything else that escapes is a bug and keeps its traceback.

The subclasses also derive from the built-in exception that callers and tests
already expect (ValueError, FileNotFoundError).
"""


class UserError(Exception):
  """Bad input from the user: the message names the field or path and the fix."""


class ConfigError(UserError, ValueError):
  """A config field is out of range, unknown, or inconsistent with another."""


class DataError(UserError, ValueError):
  """A data file exists but is unreadable, corrupt or disagrees with the config."""


class MissingDataError(UserError, FileNotFoundError):
  """A data file or folder the run needs does not exist."""


class WorkdirError(UserError, ValueError):
  """The workdir cannot be used: not a folder, or holds a run of another config."""


class MissingDependencyError(UserError, ImportError):
  """An optional package the chosen input path needs is not installed."""
