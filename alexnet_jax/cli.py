"""How every command starts and how it fails: one convention for all of them.

  cli.run(main, define_flags)  # in `if __name__ == '__main__':` of a command module

- Start: TensorFlow kept off the accelerators (JAX owns them; tf.data only needs the CPU) and
  quiet, TFDS's progress bars off, console logging at INFO without Orbax's chatter. Nothing
  of this happens on import: only a command sets what it needs.
- Failure: a `UserError` (bad config value, missing workdir, checkpoint, dataset, image...)
  prints one line, `Error: <what, and how to fix it>`, on stderr and exits with status 2,
  without a traceback; anything else is a bug and shows its traceback.
- Flags: a command's config (`--config`, ml_collections' DEFINE_config_file) is held to that
  convention as the flags are parsed (`parse_flags`), before the command's slow imports: an
  override `--config.FIELD=VALUE` that names no field, that cannot be read as the field's kind
  or that the field does not allow, or a config file that does not exist, is a UserError.
  absl's errors for the other flags keep absl's message, usage hint and exit status 1.

A command module also sets TF_CPP_MIN_LOG_LEVEL before its imports load TensorFlow (see
`quiet_tensorflow_logs`), guarded by `if __name__ == '__main__'` so that importing it does not.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import re
import sys
from typing import Any, Callable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging

from alexnet_jax import errors
from alexnet_jax.errors import UserError

EXIT_USER_ERROR = 2
# The name every command gives its config flag; overrides are --config.FIELD=VALUE.
CONFIG_FLAG = 'config'


def quiet_tensorflow_logs() -> None:
  """Hides TensorFlow's C++ start-up INFO lines, and keeps TensorFlow from importing Keras;
  effective only before TensorFlow loads.

  `import tensorflow` imports Keras' optimizers when Keras is installed (to register them for
  SavedModels; it goes on without them when that import fails). Nothing here uses Keras, and
  skipping it saves 2-3 s of every command's start on this 2-core machine (7.7 -> 4.8-5.9 s for
  `import tensorflow`).
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # `import tensorflow` writes Keras' settings file (its legacy tf.python.keras does, Keras or
  # not): into the package's cache directory, not ~/.keras.
  from alexnet_jax import paths  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('KERAS_HOME', os.path.join(paths.cache_dir(), 'keras'))
  if 'tensorflow' not in sys.modules:
    sys.modules.setdefault('keras.src.optimizers', None)  # An import of it fails at once.


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


@contextlib.contextmanager
def _user_errors_exit() -> Iterator[None]:
  """A UserError inside becomes `Error: <one line>` on stderr and exit status 2."""
  try:
    yield
  except UserError as e:
    sys.stdout.flush()
    print(f'Error: {errors.one_line(e)}', file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _guarded(main: Callable[[Sequence[str]], None], argv: Sequence[str]) -> None:
  setup_tensorflow()
  console_logging()
  with _user_errors_exit():
    main(argv)


def _overrides(argv: Sequence[str]) -> Iterator[tuple[str, str]]:
  """(FIELD, VALUE) of each --config.FIELD=VALUE in argv, matched as ml_collections matches
  them; a bare --config.FIELD is 'true', --noconfig.FIELD 'false' (absl's boolean switches)."""
  for arg in argv[1:]:
    if arg == '--':
      return
    match = re.match(rf'--?(no)?{CONFIG_FLAG}\.([^=]*)(?:=(.*))?$', arg, re.DOTALL)
    if match:
      yield match[2], match[3] if match[3] is not None else str(not match[1]).lower()


@contextlib.contextmanager
def _unknown_fields_named(argv: Sequence[str]) -> Iterator[None]:
  """Turns ml_collections' AttributeError or KeyError for an override of a field the config
  lacks (raised at DEFINE_config_file when the flag has a default file, else when the flags are
  parsed) into the field's UserError; any other stays a bug, with its traceback."""
  try:
    yield
  except (AttributeError, KeyError):
    from alexnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    for field, value in _overrides(argv):
      if field not in config_lib.SCHEMA:
        raise config_lib.rejected(field, value) from None
    raise


def _unreadable_value(error: flags.IllegalFlagValueError) -> UserError | None:
  """absl's error for an override its parser could not read (`flag --config.FIELD=VALUE:
  <the parser's complaint>`) as the field's error, or None for any other flag."""
  from alexnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  message, cause = str(error), error.__context__
  match = re.match(rf'flag --{CONFIG_FLAG}\.(\w+)=', message)
  if match is None or cause is None or not message.endswith(f': {cause}'):
    return None
  value = message[match.end():len(message) - len(f': {cause}')]
  return config_lib.rejected(match[1], value)


def _config_file(argv: Sequence[str]) -> str | None:
  """The last value of --config in argv (--config=PATH or --config PATH), or None."""
  path = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    match = re.match(rf'--?{CONFIG_FLAG}(=(.*))?$', arg, re.DOTALL)
    if match:
      path = match[2] if match[1] else (argv[i + 1] if i + 1 < len(argv) else None)
  return path


def parse_flags(argv: Sequence[str],
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses argv into `flag_values` as absl does, and checks the command's config, if it has
  one (`config.check_fields`), before its slow imports: a bad override or a missing config file
  is a UserError naming it (`config.FIELD=VALUE: must be ...`); other flag errors stay absl's
  flags.Error. Returns the arguments that are not flags."""
  has_config = CONFIG_FLAG in flag_values
  path = _config_file(argv) if has_config else None
  # ml_collections defers a missing file's IOError to the config's first use.
  if path is not None and not os.path.isfile(path.split(':', 1)[0]):
    raise UserError(f'--{CONFIG_FLAG}={path}: not a file; pass the path of a config module '
                    '(configs/*.py)')
  try:
    with _unknown_fields_named(argv):
      rest = flag_values(list(argv))
  except flags.IllegalFlagValueError as e:
    raise _unreadable_value(e) or e from None
  if has_config and flag_values[CONFIG_FLAG].value is not None:
    from alexnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    config_lib.check_fields(flag_values[CONFIG_FLAG].value)
  return rest


def _parse_flags_or_exit(argv: Sequence[str]) -> list[str]:
  """`parse_flags` for app.run: a UserError exits 2 in one line; absl's own errors print
  what absl's parser prints (message and usage hint) and exit 1."""
  with _user_errors_exit():
    try:
      return parse_flags(argv)
    except flags.Error as e:
      sys.exit(f'FATAL Flags parsing error: {e}\n'
               'Pass --helpshort or --helpfull to see help on flags.')


def run(main: Callable[[Sequence[str]], None],
        define_flags: Callable[[], None] | None = None) -> None:
  """Runs a command's `main(argv)` with absl, under the convention of this module.

  `define_flags` defines the command's flags first: only when run as a command, so that
  importing a module claims no global flag names.
  """
  quiet_tensorflow_logs()
  _checkout_configs_importable()
  if define_flags is not None:
    with _user_errors_exit(), _unknown_fields_named(sys.argv):
      define_flags()
  try:
    app.run(functools.partial(_guarded, main), flags_parser=_parse_flags_or_exit)
  except SystemExit as e:
    # absl ends --help with status 1; a help that was asked for is a success.
    if e.code == 1 and set(sys.argv[1:]) & set(HELP_FLAGS):
      raise SystemExit(0) from None
    raise
  finally:
    # The command is done (what it writes, it has closed): the interpreter's last garbage
    # collections need not walk the ~370,000 objects that importing TensorFlow, JAX and the
    # training loop leaves. That walk took 0.8-1.3 s at the end of every command on a 2-core
    # machine; frozen, ~0.1 s. (Python does not promise to finalize what is alive at exit.)
    gc.freeze()


# absl's flags that print help and exit.
HELP_FLAGS = ('--help', '-help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def _checkout_configs_importable() -> None:
  """Lets config files import each other (`from configs import alexnet`) from any directory:
  the checkout's root goes at the end of sys.path. configs/ is not installed as a package (a
  name that generic would clash with a user's own); a `configs` found earlier on the path wins.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.isfile(os.path.join(root, 'configs', '__init__.py')) and root not in sys.path:
    sys.path.append(root)


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
                    f'({e.strerror or errors.one_line(e)})') from None
  if '://' not in str(target):  # A local folder: try a file in it (permissions, read-only).
    import tempfile  # pylint: disable=g-import-not-at-top
    try:
      with tempfile.TemporaryFile(dir=str(target)):
        pass
    except OSError as e:
      raise UserError(f'--{flag}={path}: cannot write into the folder {target} '
                      f'({e.strerror or errors.one_line(e)})') from None
