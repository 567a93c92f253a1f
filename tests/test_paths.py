"""A run's files in cloud storage: a gs:// workdir, with epath's backend mocked onto a local
folder (offline; no bucket is reached).

What goes through epath is exercised here: config.json, classes.json, metrics.jsonl (rewritten
whole: object stores cannot append), data_stats.npz and command results. Orbax checkpoints
(TensorStore's gcs driver) and TensorBoard events (tf.io.gfile) use those libraries' own gs://
support, which needs a real bucket.
"""

import os
from unittest import mock

import numpy as np
import pytest
from etils import epath
from etils.epath import gpath

from alexnet_jax import paths
from alexnet_jax.core import checkpoints
from alexnet_jax.core import metrics
from alexnet_jax.core import run as run_lib
from alexnet_jax.core.kernels import Kernels
from alexnet_jax.data import stats as data_stats
from configs import tiny

BUCKET = 'gs://bucket'


@pytest.fixture
def bucket(tmp_path):
  """gs://bucket/... lands in tmp_path/bucket/...; yields that folder."""
  root = tmp_path / 'bucket'
  root.mkdir()

  def local(value):
    if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(BUCKET):
      return str(root) + os.fspath(value)[len(BUCKET):]
    return value

  def mapped(original, *args, **kwargs):
    return original(*[local(a) for a in args], **{k: local(v) for k, v in kwargs.items()})

  names = ('copy', 'exists', 'glob', 'isdir', 'listdir', 'makedirs', 'mkdir', 'open', 'remove',
           'rename', 'replace', 'rmtree', 'stat', 'walk')
  # With TensorFlow installed epath sends gs:// to tf.io.gfile, past the mock: not here.
  with mock.patch.object(gpath, '_is_tf_installed', lambda: False), \
       epath.testing.mock_epath(**{name: mapped for name in names}):
    yield root


def test_a_gs_workdir_keeps_its_url(bucket):
  del bucket
  assert str(paths.resolve('gs://bucket/run')) == 'gs://bucket/run'
  assert checkpoints.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  assert paths.is_url('gs://bucket/run') and not paths.is_url('runs/x')
  assert str(paths.resolve('~/run')) == os.path.expanduser('~/run')


def test_the_files_of_a_run_in_a_bucket(bucket):
  workdir = f'{BUCKET}/runs/tiny'
  config = tiny.get_config()
  run_lib.write_config(workdir, config, Kernels())
  run_lib.record_classes(workdir, ('a', 'b'))
  run_lib.record_classes(workdir, ('a', 'b'))  # A resumed run checks them.
  with pytest.raises(Exception, match='differ'):
    run_lib.record_classes(workdir, ('b', 'a'))
  for step in (1, 2):  # A run, then its resumption: the file grows, never starts over.
    writer = metrics.MetricWriter(workdir, tensorboard=False)
    writer.write(step, {'train/loss': 1.0 / step})
    writer.close()
  stats = {'rgb_mean': np.arange(3, dtype=np.float32), 'num_images': np.int64(7)}
  data_stats.save_stats(f'{workdir}/{data_stats.STATS_FILENAME}', stats)
  paths.write_json(f'{workdir}/result.json', {'ok': 1})

  local = bucket / 'runs' / 'tiny'
  assert sorted(p.name for p in local.iterdir()) == [
      'classes.json', 'config.json', 'data_stats.npz', 'metrics.jsonl', 'result.json']
  run = run_lib.open_run(workdir)
  assert run.workdir == workdir
  assert run.config.to_dict() == config.to_dict()
  assert run.class_names() == ['a', 'b']
  assert [r['step'] for r in metrics.read_jsonl(f'{workdir}/metrics.jsonl')] == [1, 2]
  loaded = data_stats.load_stats(f'{workdir}/{data_stats.STATS_FILENAME}')
  np.testing.assert_array_equal(loaded['rgb_mean'], stats['rgb_mean'])
