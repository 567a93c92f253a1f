"""alexnet_jax/relu_vs_tanh.py: Figure 1's comparison on a tiny budget."""

import json
import sys

import pytest
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from alexnet_jax.paper import relu_vs_tanh

import conftest


def test_the_two_nets_differ_only_in_the_activation():
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 3)) * 50
  relu, tanh = relu_vs_tanh.FourLayerNet('relu'), relu_vs_tanh.FourLayerNet('tanh')
  params = relu.init(jax.random.key(0), x)['params']
  # Four layers with weights: three convolutions and the softmax layer.
  assert sorted(params) == ['Conv_0', 'Conv_1', 'Conv_2', 'Dense_0']
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      tanh.init(jax.random.key(0), x)['params'])
  # Same parameters, different outputs: only the activation tells the two apart.
  assert not np.allclose(relu.apply({'params': params}, x), tanh.apply({'params': params}, x))
  assert relu.apply({'params': params}, x).shape == (2, 10)


@pytest.mark.slow
def test_tiny_sweep_writes_the_figure_and_reports_epochs(tmp_path):
  # The command, on configs/tiny.py's 16x16 digits (the sweep's logic, at a quarter of the
  # pixels), with XLA's optimisations on: its time is in running the two nets over the 1,437
  # training images 8 times (with the suite's level 0, 17 of its 24 s), not in compiling them.
  out, report = tmp_path / 'fig1.png', tmp_path / 'fig1.json'
  proc = conftest.run([sys.executable, '-m', 'alexnet_jax.paper.relu_vs_tanh',
                       f'--config={conftest.TINY}', '--config.num_train_steps=-1',
                       '--config.num_eval_steps=-1', '--epochs=0.5', '--learning_rates=0.03',
                       '--evals_per_epoch=4', f'--output={out}', f'--json={report}'],
                      env=conftest.env_optimised(), check=True)
  assert 'relu: lr 0.03, ' in proc.stdout and f'Wrote {out}' in proc.stdout, proc.stdout
  assert Image.open(out).size[0] > 300
  with open(report, encoding='utf-8') as f:
    result = json.load(f)
  for activation in ('relu', 'tanh'):
    run = result['best'][activation]
    assert run['epochs'][0] == 0 and run['epochs'][-1] == 0.5
    assert len(run['epochs']) == len(run['train_error']) >= 3
    # Errors over the whole training set: counts of its 1,437 digits.
    counts = np.asarray(run['train_error']) * 1437
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-6)
    reached = [e for e, err in zip(run['epochs'], run['train_error']) if err <= 0.25]
    assert run['epochs_to_target'] == (reached[0] if reached else None)
  # The two activations train differently from the same start.
  assert result['best']['relu']['train_error'] != result['best']['tanh']['train_error']
  text = relu_vs_tanh._reached_text(None)  # pylint: disable=protected-access
  assert text == '25% not reached'
  speed = relu_vs_tanh._speed_text  # pylint: disable=protected-access
  assert (speed(6.0), speed(0.5), speed(None)) == ('ReLU 6.0x faster', 'tanh 2.0x faster', '')


def test_fastest_learning_rate_is_chosen():
  slow = {'epochs_to_target': 3.0, 'train_error': [1, 0.2]}
  fast = {'epochs_to_target': 1.0, 'train_error': [1, 0.3]}
  never = {'epochs_to_target': None, 'train_error': [1, 0.01]}
  key = relu_vs_tanh._speed_key  # pylint: disable=protected-access
  assert min([slow, never, fast], key=key) is fast
  assert jnp.isinf(key(never)[0])
