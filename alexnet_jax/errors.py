"""The errors a user can fix. Every command prints their message on one line and exits with 2.

Anything else that escapes a command is a bug and keeps its traceback (`alexnet_jax.cli`).
This module imports nothing but the standard library, so every part of the package can use it.
"""


class UserError(Exception):
  """A problem with what the user gave (a flag, a config value, a path, a file); the message
  names the thing and says how to fix it."""


class ConfigError(UserError, ValueError):
  """A config field has a value that cannot run: the message names the field, the value and
  what is allowed."""


class DataError(UserError, ValueError):
  """The data the config asks for is missing or unusable; the message says what to do."""


class RunError(UserError, FileNotFoundError):
  """A workdir is not a run, or lacks what a command needs from it (a checkpoint, statistics)."""


class ImageReadError(UserError, ValueError):
  """An image file is missing or cannot be decoded; the message names the path."""


class TrainingDivergedError(UserError, FloatingPointError):
  """The loss or the parameters became NaN or infinite; the last good checkpoint is kept."""


def one_line(error: BaseException) -> str:
  """The message of `error` on one line, as every command prints it."""
  return ' '.join(str(error).split())
