"""One convention for user errors in every command, and no import-time side effects.

Every command is run as a user would run it (as its `__main__`, with its argv), from a directory
outside the checkout, with one mistake: one line `Error: ...` naming it, exit status 2, no
traceback, nothing created.
"""

import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax import errors
from alexnet_jax import config as config_lib

import conftest


def _cases(tmp):
  """(name, argv, text the error line must hold) for every command."""
  missing = os.path.join(tmp, 'no_such_run')
  main = [os.path.join(conftest.ROOT, 'main.py'), f'--config={conftest.TINY}']
  return [
      ('main: bad config value', [*main, f'--workdir={tmp}/new_run', '--config.batch_size=-3'],
       'config.batch_size=-3: must be an integer >= 1'),
      ('main: eval of a missing workdir', [*main, f'--workdir={missing}', '--mode=eval'],
       f'{missing} is not a directory'),
      ('evaluate', ['-m', 'alexnet_jax.paper.evaluate', f'--workdirs={missing}'],
       f'{missing} is not a directory'),
      ('predict', ['-m', 'alexnet_jax.paper.predict', f'--workdir={missing}', 'x.png'],
       f'{missing} is not a directory'),
      ('figures', ['-m', 'alexnet_jax.paper.figures', 'filters', f'--workdir={missing}',
                   f'--output={tmp}/f.png'], f'{missing} is not a directory'),
      ('ablations', ['-m', 'alexnet_jax.paper.ablations', '--names=no_such_ablation',
                     f'--output={tmp}/a.json'], "unknown ablations ['no_such_ablation']"),
      ('relu_vs_tanh', ['-m', 'alexnet_jax.paper.relu_vs_tanh', '--learning_rates=fast',
                        f'--output={tmp}/r.png'], '--learning_rates=fast: give numbers'),
      ('benchmark', ['-m', 'alexnet_jax.bench.benchmark', '--what=everything'],
       "--what: unknown ['everything']"),
      ('scaling', ['-m', 'alexnet_jax.bench.scaling', '--strategies=pipeline',
                   f'--output={tmp}/s'], "--strategies: unknown ['pipeline']"),
      ('pipeline benchmark', ['-m', 'alexnet_jax.bench.pipeline', '--batches=0'],
       '--batches=0 must be >= 1'),
      ('data statistics', ['-m', 'alexnet_jax.data.stats', f'--workdir={missing}'],
       f'{missing} is not a directory'),
      ('import weights', ['-m', 'alexnet_jax.weights.import_weights', '--format=torchvision',
                          f'--file={tmp}/no_such.pth', f'--workdir={tmp}/imported'],
       f'--file={tmp}/no_such.pth: no such file'),
      ('export', ['-m', 'alexnet_jax.weights.export', f'--workdir={missing}',
                  f'--output={tmp}/saved'], f'{missing} is not a directory'),
  ]


@pytest.mark.slow
def test_every_command_reports_a_user_error_in_one_line(tmp_path):
  cases = _cases(str(tmp_path))
  before = sorted(os.listdir(tmp_path))
  # One after another in one interpreter (conftest.run_commands), from tmp_path; main.py's
  # first case also as a process of its own, as a user starts it.
  results = conftest.run_commands([(argv, tmp_path) for _, argv, _ in cases])
  alone = conftest.run([sys.executable, *cases[0][1]], cwd=tmp_path)
  for (name, _, expected), proc in zip([*cases, cases[0]], [*results, alone]):
    lines = [line for line in proc.stderr.splitlines() if line.startswith('Error: ')]
    assert proc.returncode == cli.EXIT_USER_ERROR, (name, proc.stdout, proc.stderr[-3000:])
    assert len(lines) == 1 and expected in lines[0], (name, proc.stderr[-3000:])
    assert 'Traceback' not in proc.stderr, (name, proc.stderr[-3000:])
  assert sorted(os.listdir(tmp_path)) == before  # no half-created workdir or output


def test_a_bug_keeps_its_traceback():
  def user_mistake(argv):
    raise errors.DataError('the folder has no images:\n  add some')

  def bug(argv):
    raise KeyError('a bug')

  with pytest.raises(SystemExit) as e:
    cli._guarded(user_mistake, [])  # pylint: disable=protected-access
  assert e.value.code == 2
  with pytest.raises(KeyError):
    cli._guarded(bug, [])  # pylint: disable=protected-access
  assert errors.one_line(errors.DataError('a\n  b')) == 'a b'


_IMPORT_EVERYTHING = r'''
import json, os, pkgutil, signal, sys, importlib
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
import jax
import matplotlib
backend = lambda: dict.__getitem__(matplotlib.rcParams, 'backend')  # without resolving it
calls = []
tf.config.set_visible_devices = lambda *a, **k: calls.append('tf.config.set_visible_devices')
tfds.disable_progress_bar = lambda *a, **k: calls.append('tfds.disable_progress_bar')
before = dict(env=dict(os.environ), path=list(sys.path), verbosity=logging.get_verbosity(),
              jax={k: repr(v) for k, v in jax.config.values.items()},
              handlers={s: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)},
              matplotlib_backend=repr(backend()))
import alexnet_jax
names = [m.name for m in pkgutil.walk_packages(alexnet_jax.__path__, 'alexnet_jax.')]
for name in names:
  importlib.import_module(name)
after = dict(env=dict(os.environ), path=list(sys.path), verbosity=logging.get_verbosity(),
             jax={k: repr(v) for k, v in jax.config.values.items()},
             handlers={s: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)},
             matplotlib_backend=repr(backend()))
changed = sorted(k for k in before if before[k] != after[k])
print(json.dumps({'modules': names, 'calls': calls, 'changed': changed}))
'''


@pytest.mark.slow
def test_importing_any_module_changes_no_global_setting(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  proc = conftest.run([sys.executable, '-c', _IMPORT_EVERYTHING], cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(report['modules']) >= 25 and 'alexnet_jax.paper.figures' in report['modules']
  assert report['calls'] == [] and report['changed'] == [], report


def test_an_output_that_cannot_be_written_stops_a_command_before_its_work(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(errors.UserError, match=r'--output=.*a_file/run/x.json: cannot create'):
    cli.prepare_output(str(blocker / 'run' / 'x.json'))
  with pytest.raises(errors.UserError, match='--json=.*cannot create'):
    cli.prepare_output(str(blocker / 'out'), flag='json', folder=True)
  cli.prepare_output(str(tmp_path / 'new' / 'deeper' / 'x.png'))  # creates the folder only
  assert (tmp_path / 'new' / 'deeper').is_dir()
  assert not (tmp_path / 'new' / 'deeper' / 'x.png').exists()
  cli.prepare_output(str(tmp_path / 'scaling'), folder=True)
  assert (tmp_path / 'scaling').is_dir()


# ---------------------------------------------------------------- bad --config.FIELD=VALUE


def _command_line_values(field):
  """{category: texts} for --config.FIELD=TEXT that `field` must refuse, made from its own
  description. A category a kind has none of is absent:
  - str and optional path fields have no wrong type (every text is a string) and no range;
  - bool has no range (a text is true, false or not a bool: the wrong type);
  - choice: a wrong type is a text that is not one of the choices, out of range another.
  Empty is refused by every field, the optional paths included: an empty value is far more
  often a shell variable that expanded to nothing than a wish for None, the config's default.
  """
  number = lambda v: repr(float(v))  # a text whose parsed value prints as the text itself
  values = {'empty': ['']}
  if field.kind == 'int':
    values['wrong type'] = ['abc', '1.5', 'True']
    values['out of range'] = [str(field.low - 1), str(field.high + 1)]
  elif field.kind == 'number':
    values['wrong type'] = ['abc', 'True']
    values['out of range'] = ['nan', 'inf', '-inf']  # no number field takes a non-finite one
    if field.low is not None:
      values['out of range'].append(number(field.low if field.low_open else field.low - 1))
    if field.high is not None:
      values['out of range'].append(number(field.high if field.high_open else field.high + 1))
  elif field.kind == 'numbers':
    values['wrong type'] = ['abc', '(1, x y)']
    values['out of range'] = [f'({field.low - 1},)']
  elif field.kind == 'bool':
    values['wrong type'] = ['maybe', '2']
  elif field.kind == 'choice':
    values['wrong type'] = ['1']
    values['out of range'] = [str(field.choices[0]).upper() + '!']
  return values


def _good_values(field):
  """(text, value) pairs `field` must take from the command line, among them a fraction for a
  number field: ml_collections reads an override by the type of the config's value, so an int
  there would refuse it."""
  if field.kind == 'int':
    return [(str(field.low), field.low), (str(field.high), field.high)]
  if field.kind == 'number':
    return [(repr((field.low or 0) + 0.5), (field.low or 0) + 0.5)]
  if field.kind == 'numbers':
    return [('(0.5, 2)', (0.5, 2)), ('3', (3,))]
  if field.kind == 'bool':
    return [('false', False), ('True', True)]
  if field.kind == 'choice':
    return [(str(c), c) for c in field.choices]
  return [('x', 'x'), ('a/b c', 'a/b c')]


def _parse(*args, default=None):
  """cli.parse_flags as a command runs it: main.py's config flag, in fresh flags."""
  argv = ['main.py', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', default, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  cli.parse_flags(argv, flag_values)
  return flag_values.config


_NO_LOAD_MODULE_WARNING = pytest.mark.filterwarnings(  # ml_collections' loader, once per case
    'ignore:the load_module:DeprecationWarning')


@_NO_LOAD_MODULE_WARNING
def test_every_field_refuses_bad_command_line_values_in_one_line():
  cases, categories = 0, {}
  for name, field in config_lib.SCHEMA.items():
    values = _command_line_values(field)
    categories.setdefault(field.kind, set()).update(values)
    for category, texts in values.items():
      for text in texts:
        with pytest.raises(errors.ConfigError) as e:
          _parse(f'--config={conftest.TINY}', f'--config.{name}={text}')
        # The text as typed, as a string, or as the tuple a numbers field reads it into.
        expected = [f'config.{name}={value}: must be {field.allowed()}'
                    for value in (text, repr(text), repr((text,)))]
        assert errors.one_line(e.value) == str(e.value) in expected, (category, name, text)
        cases += 1
  assert categories == {'int': {'wrong type', 'out of range', 'empty'},
                        'number': {'wrong type', 'out of range', 'empty'},
                        'numbers': {'wrong type', 'out of range', 'empty'},
                        'choice': {'wrong type', 'out of range', 'empty'},
                        'bool': {'wrong type', 'empty'}, 'str': {'empty'}}, categories
  print(f'{cases} bad values over {len(config_lib.SCHEMA)} fields')


@_NO_LOAD_MODULE_WARNING
def test_every_field_takes_good_command_line_values():
  for name, field in config_lib.SCHEMA.items():
    for text, value in _good_values(field):
      config = _parse(f'--config={conftest.TINY}', f'--config.{name}={text}')
      assert config[name] == value and type(config[name]) is type(value), (name, text)


@_NO_LOAD_MODULE_WARNING
def test_an_unknown_field_or_a_missing_config_file_is_named():
  with pytest.raises(errors.ConfigError, match=r"^config.learning_rat='0.1': no such field; "
                     r'did you mean config.learning_rate\?$'):
    _parse(f'--config={conftest.TINY}', '--config.learning_rat=0.1')
  with pytest.raises(errors.ConfigError, match=r"^config.nope='true': no such field"):
    _parse(f'--config={conftest.TINY}', '--config.nope')
  # A config flag with a default file reads its overrides when it is defined (cli.run).
  argv = ['cmd', '--config.nope=1']
  with pytest.raises(errors.ConfigError, match=r"^config.nope='1': no such field"):
    with cli._unknown_fields_named(argv):  # pylint: disable=protected-access
      config_flags.DEFINE_config_file('config', conftest.TINY, flag_values=flags.FlagValues(),
                                      sys_argv=argv)
  with pytest.raises(errors.UserError, match=r'^--config=no/such.py: not a file'):
    _parse('--config=no/such.py', '--config.seed=1')
  with pytest.raises(errors.UserError, match=r'^--config=: not a file'):
    _parse('--config=')


@_NO_LOAD_MODULE_WARNING
def test_other_flags_keep_absl_errors():
  flag_values = flags.FlagValues()
  flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'mode', flag_values=flag_values)
  with pytest.raises(flags.IllegalFlagValueError):
    cli.parse_flags(['main.py', '--mode=bogus'], flag_values)
  with pytest.raises(flags.Error):  # an override before its config file: ml_collections' own
    _parse('--config.seed=1', f'--config={conftest.TINY}')


def test_bad_config_values_stop_main_in_one_line_before_any_work(tmp_path):
  """One real run per category, in both modes: nothing but the error line, nothing on disk."""
  # (mode, field, text, the value the error names): wrong type, out of range, empty.
  cases = [('train', 'batch_size', 'abc', 'abc'),
           ('eval', 'seed', str(config_lib.INT_MAX + 1), config_lib.INT_MAX + 1),
           ('train', 'cache', '', '')]
  with conftest.Processes() as group:
    for mode, name, text, _ in cases:
      group.start([sys.executable, os.path.join(conftest.ROOT, 'main.py'),
                   f'--config={conftest.TINY}', f'--workdir={tmp_path}/run', f'--mode={mode}',
                   f'--config.{name}={text}'], cwd=tmp_path, stderr=conftest.LOG)
    for i, (mode, name, _, value) in enumerate(cases):
      returncode = group.wait_one(i, timeout=300)
      out, err = group.output(i), group.errors(i)
      assert returncode == cli.EXIT_USER_ERROR, (mode, name, out, err[-3000:])
      assert err.splitlines() == [f'Error: {config_lib.rejected(name, value)}'], err[-3000:]
  assert os.listdir(tmp_path) == []
