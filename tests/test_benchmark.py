"""Smoke test of the benchmark command (timings belong to the command, never to a test)."""

import pytest
import json
import os
import sys

import conftest


@pytest.mark.slow
def test_benchmark_command_prints_json_measurements():
  cmd = [sys.executable, '-m', 'alexnet_jax.bench.benchmark', '--config=configs/tiny.py',
         '--what=train,eval,layers', '--layers=conv1,pool1', '--steps=1', '--warmup=0', '--json',
         '--cpu_devices=2', '--batch_size=4']
  proc = conftest.run(cmd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  by_kind = {}
  for r in records:
    by_kind.setdefault(r['measurement'], []).append(r)
  train = by_kind['train'][0]
  for key in ('train_images_per_sec', 'step_ms', 'devices', 'batch_size', 'dtype', 'compile_s'):
    assert key in train
  assert train['batch_size'] == 4 and train['devices'] == 1 and train['dtype'] == 'float32'
  assert train['train_images_per_sec'] > 0
  assert train['conv_backend'] in ('onednn', 'xla') and train['malloc'] in ('kept', 'default')
  # The kernels the step ran with, resolved once as training resolves them, printed and recorded.
  from alexnet_jax.core import kernels  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  resolved = kernels.resolve(tiny.get_config()).as_dict()
  assert {k: train[k] for k in resolved} == resolved
  assert f'kernels: {kernels.Kernels(**resolved).describe()}' in proc.stdout
  assert {'eval_center_crop', 'eval_ten_crop'} <= set(by_kind)
  layers = {(r['layer'], r['impl']) for r in by_kind['layer']}
  assert {('conv1', 'im2col'), ('conv1', 'direct'), ('pool1', 'mask'),
          ('pool1', 'reduce_window')} <= layers
  assert {layer for layer, _ in layers} == {'conv1', 'pool1'}  # --layers: only those
  assert train['parallelism'] == 'data' and train['peak_memory_bytes'] > 0


def test_forward_flops_of_the_paper_network():
  from alexnet_jax.bench import benchmark  # pylint: disable=g-import-not-at-top
  from configs import alexnet  # pylint: disable=g-import-not-at-top
  # docs/paper.md: 0.724 G multiply-adds per image (conv 666 M + FC 59 M).
  macs = benchmark.forward_flops(alexnet.get_config()) / 2
  assert abs(macs - 0.724e9) / 0.724e9 < 0.01, macs


_FAKE_PEER = """
import json, os, sys
print('progress noise')
print(json.dumps({'peer': 'torch', 'bf16': '--bf16' in sys.argv, 'train_images_per_sec': 1.0,
                  'arena_max': os.environ.get('MALLOC_ARENA_MAX')}))
"""


def test_peer_runs_under_each_allocator_setting(tmp_path):
  from alexnet_jax.bench import benchmark  # pylint: disable=g-import-not-at-top
  peer = tmp_path / 'peer.py'
  peer.write_text(_FAKE_PEER)
  results = benchmark.run_peer(str(peer), batch=4, steps_=1, malloc=('default', 'kept'))
  assert [(r['malloc'], r['bf16']) for r in results] == [
      ('default', False), ('default', True), ('kept', False), ('kept', True)]
  # The like-for-like run gives the peer our settings; the default one leaves its environment.
  assert [r['arena_max'] for r in results[2:]] == ['1', '1']
  assert results[0]['arena_max'] == os.environ.get('MALLOC_ARENA_MAX')


_WITHOUT_TENSORFLOW = """
import runpy, sys

class Blocked:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'sklearn'):
      raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')

sys.meta_path.insert(0, Blocked())
sys.argv = ['benchmark'] + sys.argv[1:]
try:
  runpy.run_module('alexnet_jax.bench.benchmark', run_name='__main__')
finally:
  loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'sklearn'))
  print('LOADED', loaded)
"""


@pytest.mark.slow
def test_the_train_step_benchmark_runs_without_tensorflow(tmp_path):
  """An accelerator image with JAX but no TensorFlow, tfds or scikit-learn measures the step."""
  cmd = [sys.executable, '-c', _WITHOUT_TENSORFLOW, '--config=configs/tiny.py', '--what=train',
         '--steps=1', '--warmup=0', '--batch_size=8', '--json']
  proc = conftest.run(cmd)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert records[0]['measurement'] == 'train' and records[0]['train_images_per_sec'] > 0
  assert 'LOADED []' in proc.stdout
