"""alexnet_jax/core/run.py: the one way to open a run, read-only."""

import json
import os
import shutil

import pytest

from alexnet_jax import errors
from alexnet_jax.core import kernels
from alexnet_jax.core import run as run_lib
from alexnet_jax.paper import evaluate
from alexnet_jax.paper import figures
from alexnet_jax.paper import predict


def _snapshot(directory):
  """Every file under `directory` with its size and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


def test_commands_that_read_a_run_write_nothing_into_it(tiny_workdir, tmp_path):
  before = _snapshot(tiny_workdir)
  evaluate.evaluate_workdirs([tiny_workdir], crops=['center_crop'])
  figures.plot_filters(tiny_workdir, str(tmp_path / 'filters.png'))
  image = tmp_path / 'digit.png'
  shutil.copy(tmp_path / 'filters.png', image)
  predict.predict_files(tiny_workdir, [str(image)])
  assert _snapshot(tiny_workdir) == before


def test_open_run_reads_config_classes_statistics_and_checkpoint(tiny_workdir):
  run = run_lib.open_run(tiny_workdir)
  assert run.config.model == 'small' and run.class_names() == [str(i) for i in range(10)]
  assert run.mean().shape == (1, 1, 3)
  restored = run.restore(which='latest')
  assert restored.step == 4 and 'conv1' in restored.params
  # The kernels training resolved are recorded in config.json, and are what resolve() gives.
  with open(os.path.join(tiny_workdir, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)['resolved_kernels']
  assert saved == run.resolved_kernels == kernels.resolve(run.config).as_dict()


def test_missing_pieces_are_errors_that_say_what_to_do(tiny_workdir, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(tiny_workdir, copy)
  os.remove(copy / 'data_stats.npz')
  with pytest.raises(errors.RunError, match=f'python -m alexnet_jax.data.stats --workdir={copy}'):
    run_lib.open_run(str(copy)).mean()
  os.remove(copy / 'classes.json')
  with pytest.raises(errors.RunError, match='classes.json does not exist'):
    run_lib.open_run(str(copy)).class_names()
  shutil.rmtree(copy / 'checkpoints')
  with pytest.raises(errors.RunError, match='No checkpoints'):
    run_lib.open_run(str(copy)).restore()
  with pytest.raises(errors.RunError, match='not the workdir of a run'):
    run_lib.open_run(str(tmp_path))
