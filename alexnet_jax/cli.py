"""How every command starts and how it fails: one convention for all of them.

  cli.run(main, define_flags)  # in `if __name__ == '__main__':` of a command module

- Start: TensorFlow kept off the accelerators (JAX owns them; tf.data only needs the CPU) and
  quiet, TFDS's progress bars off, console logging at INFO without Orbax's chatter. Nothing
  of this happens on import: only a command sets what it needs.
- Failure: a `UserError` (bad config value, missing workdir, checkpoint, dataset, image...)
  prints one line, `Error: <what, and how to fix it>`, on stderr and exits with status 2,
  without a traceback; absl's own flag-parsing errors keep their usage message; anything else is
  a bug and shows its traceback.

A command module also sets TF_CPP_MIN_LOG_LEVEL before its imports load TensorFlow (see
`quiet_tensorflow_logs`), guarded by `if __name__ == '__main__'` so that importing it does not.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import logging

from alexnet_jax.errors import UserError

EXIT_USER_ERROR = 2


def quiet_tensorflow_logs() -> None:
  """Hides TensorFlow's C++ start-up INFO lines; effective only before TensorFlow loads."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def console_logging() -> None:
  """The commands' console: INFO progress lines, without Orbax's INFO chatter (dozens of lines
  per checkpoint)."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)

  class _Filter(std_logging.Filter):

    def filter(self, record):
      return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname

  logging.get_absl_logger().addFilter(_Filter())


def setup_tensorflow() -> None:
  """TensorFlow off the GPUs and TPUs (JAX owns them), TFDS without progress bars; a no-op
  where TensorFlow is not loaded yet (a command that imports it later calls this again)."""
  if 'tensorflow' not in sys.modules:
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF initialised its devices already.
    logging.warning('TensorFlow was initialised before the command started; it may hold GPUs.')
  if 'tensorflow_datasets' in sys.modules:  # (idempotent, like the line above)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def one_line(error: BaseException) -> str:
  """The message of `error` on one line."""
  return ' '.join(str(error).split())


def _guarded(main: Callable[[Sequence[str]], None], argv: Sequence[str]) -> None:
  setup_tensorflow()
  console_logging()
  try:
    main(argv)
  except UserError as e:
    sys.stdout.flush()
    print(f'Error: {one_line(e)}', file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[Sequence[str]], None],
        define_flags: Callable[[], None] | None = None) -> None:
  """Runs a command's `main(argv)` with absl, under the convention of this module.

  `define_flags` defines the command's flags first: only when run as a command, so that
  importing a module claims no global flag names.
  """
  quiet_tensorflow_logs()
  if define_flags is not None:
    define_flags()
  app.run(functools.partial(_guarded, main))


def checkout_config(name: str) -> str | None:
  """configs/<name> of the source checkout this package runs from (an editable install, as
  requirements.txt makes), or None: the default of a command's --config flag."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      name)
  return path if os.path.exists(path) else None


def load_config_module(path: str) -> Any:
  """The Python config module at `path` (a file of configs/, given on the command line), for
  commands that need more of it than `get_config()`; a missing file is a UserError."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if not path or not os.path.isfile(path):
    raise UserError(f'{path!r} is not a file: pass the path of a config module (configs/*.py).')
  name = 'alexnet_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def prepare_output(path: str, flag: str = 'output', folder: bool = False) -> None:
  """Creates the folder of the output file `path` (or the folder `path`) before a command's
  work, so a place it cannot write stops it at once, in one line, not after an hour of work."""
  from alexnet_jax import paths  # pylint: disable=g-import-not-at-top
  target = paths.resolve(path)
  target = target if folder else target.parent
  try:
    target.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'--{flag}={path}: cannot create the folder {target} '
                    f'({e.strerror or one_line(e)})') from None


def format_duration(seconds: float) -> str:
  """H:MM:SS, for the ETAs of long commands (training, preparation)."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def write_json(path: str, data: Any, indent: int = 2) -> None:
  """Writes a command's JSON result to `path` (whole or not at all), creating its folder; in a
  run of several processes, process 0 writes it (every process holds the same result)."""
  import json  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from alexnet_jax import paths  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  paths.write_atomic(path, json.dumps(data, indent=indent))
