"""One convention for user errors in every command, and no import-time side effects.

Every command is started as a user would, from a directory outside the checkout, with one
mistake: one line `Error: ...` naming it, exit status 2, no traceback, nothing created.
"""

import os
import subprocess
import sys

import pytest

from alexnet_jax import cli
from alexnet_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')


def _cases(tmp):
  """(name, argv, text the error line must hold) for every command."""
  missing = os.path.join(tmp, 'no_such_run')
  return [
      ('main: bad config value', [os.path.join(ROOT, 'main.py'), f'--config={TINY}',
                                  f'--workdir={tmp}/new_run', '--config.batch_size=-3'],
       'config.batch_size=-3: must be an integer >= 1'),
      ('main: eval of a missing workdir', [os.path.join(ROOT, 'main.py'), f'--config={TINY}',
                                           f'--workdir={missing}', '--mode=eval'],
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
  ]


def test_every_command_reports_a_user_error_in_one_line(tmp_path):
  cases = _cases(str(tmp_path))
  before = sorted(os.listdir(tmp_path))
  # Started together: the time is in importing TensorFlow and JAX, ten times.
  procs = [subprocess.Popen([sys.executable, *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _, argv, _ in cases]
  for (name, argv, expected), proc in zip(cases, procs):
    out, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.startswith('Error: ')]
    assert proc.returncode == cli.EXIT_USER_ERROR, (name, out, err[-3000:])
    assert len(lines) == 1 and expected in lines[0], (name, err[-3000:])
    assert 'Traceback' not in err, (name, err[-3000:])
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
  assert cli.one_line(errors.DataError('a\n  b')) == 'a b'


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


def test_importing_any_module_changes_no_global_setting(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  proc = subprocess.run([sys.executable, '-c', _IMPORT_EVERYTHING], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
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
