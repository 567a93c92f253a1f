"""Parallelism strategies (core/parallel.py): the same training as one device, the exchanges
where the schemes put them, and runs that train, save and resume in each layout."""

import jax
import numpy as np
import pytest

import conftest

from alexnet_jax import errors
from alexnet_jax.bench import collectives
from alexnet_jax.core import parallel
from alexnet_jax.core import steps
from alexnet_jax.core import train

STEPS = 3


def _config(**overrides):
  # The strategies draw different masks; without dropout they must agree.
  return conftest.tiny_config(**{'dropout_rate': 0.0, **overrides})


def _batches(config, num=STEPS):
  rng = np.random.default_rng(0)
  b, s = config.batch_size, config.image_size
  return [{'image': (rng.normal(size=(b, s, s, 3)) * 50).astype(np.float32),
           'label': rng.integers(0, config.num_classes, b).astype(np.int32)} for _ in range(num)]


def _train(config, num_devices):
  """STEPS steps of `config`'s strategy on the first `num_devices` devices: (losses, params)."""
  model, tx, host = steps.initial_state(config)
  placement = parallel.Placement(config, model, tx, host, devices=jax.devices()[:num_devices])
  state = placement.put_state(host)
  losses = []
  for batch in placement.batches(_batches(config), ahead=1):
    state, m, _ = placement.train_step(state, batch, np.float32(0.02),
                                       placement.stop_votes(False))
    losses.append(float(parallel.first_value(m['train/loss'])))
  return losses, placement.host_state(state).params


@pytest.fixture(scope='module')
def one_device():
  return _train(_config(), 1)


@pytest.mark.parametrize('strategy,num_devices,model_parallel', [
    ('data', 8, 0), ('columns', 4, 0), ('columns', 8, 0), ('hybrid', 4, 0), ('hybrid', 8, 0),
    ('hybrid', 8, 2)])  # the last: 4 groups of 2 split the FC layers, the convs over all 8
def test_every_strategy_trains_as_one_device_does(one_device, strategy, num_devices,
                                                  model_parallel):
  losses, params = _train(_config(parallelism=strategy, model_parallel=model_parallel),
                          num_devices)
  ref_losses, ref_params = one_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert ref_losses[-1] != ref_losses[0]  # The steps did move the parameters.
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
  for (path, ref), got in zip(flat_ref, jax.tree_util.tree_leaves(params)):
    assert got.shape == ref.shape  # The one-device layout, whatever the strategy.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _compiled_collectives(config, num_devices):
  model, tx, host = steps.initial_state(config)
  placement = parallel.Placement(config, model, tx, host, devices=jax.devices()[:num_devices])
  batch = next(placement.batches(_batches(config, 1), ahead=0))
  compiled = placement.train_step.lower(placement.put_state(host), batch, np.float32(0.01),
                                        placement.stop_votes(False)).compile()
  return collectives.collectives(compiled.as_text(), num_devices), placement


def test_columns_exchange_activations_only_at_conv3_and_the_fc_layers():
  config = _config(parallelism='columns')
  found, placement = _compiled_collectives(config, 4)
  pairs = placement.mesh.shape['model']
  activations = [c for c in found if c.layer]
  # §3.2: conv3 sees both columns, and so does every FC layer; conv1, conv2, conv4, conv5, the
  # LRN and the pools stay within their column. Each exchange once forward, once backward.
  assert sorted((c.layer, c.backward) for c in activations) == sorted(
      (layer, backward) for layer in ('conv3', 'fc6', 'fc7', 'fc8')
      for backward in (False, True))
  assert all(c.group_size == pairs == 2 for c in activations)
  # conv3 gathers both columns' pooled conv2 maps for the pair's images: [8, 3, 3, 64] float32.
  conv3 = next(c for c in activations if c.layer == 'conv3' and not c.backward)
  group_batch = config.batch_size // placement.mesh.shape['data']
  assert conv3.kind == 'all-gather' and conv3.full_bytes == group_batch * 3 * 3 * 64 * 4
  # Everything else sums gradients and metrics: no other activation leaves a device.
  others = [c for c in found if not c.layer]
  assert others and all(c.kind == 'all-reduce' for c in others)
  params = 237_770 // 2 + 10  # each device's half (fc8's bias is whole), summed over data
  assert max(c.result_bytes for c in others) >= 4 * params * 0.99


def test_hybrid_gathers_images_before_fc6_and_sums_conv_gradients():
  found, _ = _compiled_collectives(_config(parallelism='hybrid'), 4)
  layers = {c.layer for c in found if c.layer}
  assert layers == {'fc6', 'fc7', 'fc8'}  # The convolutional layers run alone on each device.
  fc6 = next(c for c in found if c.layer == 'fc6' and not c.backward)
  assert fc6.kind == 'all-gather' and fc6.group_size == 4
  assert fc6.full_bytes == 16 * 64 * 4  # all 16 images' pool5 (1x1x64) features
  data_found, _ = _compiled_collectives(_config(), 4)
  assert not any(c.layer for c in data_found)  # data parallelism exchanges gradients only
  assert collectives.bytes_sent(data_found) > collectives.bytes_sent(found) > 0


@pytest.mark.parametrize('overrides,num_devices,message', [
    ({'parallelism': 'columns', 'model': 'small_one_column', 'lrn_within_columns': False}, 4,
     "two columns"),
    ({'parallelism': 'columns'}, 3, 'multiple of 2 devices'),
    ({'parallelism': 'columns', 'model_parallel': 4}, 4, 'model axis of 2'),
    ({'parallelism': 'hybrid', 'model_parallel': 3}, 6, 'split the fully connected'),
    ({'parallelism': 'data', 'model_parallel': 2}, 4, 'splits no layer'),
])
def test_strategies_that_cannot_run_are_config_errors(overrides, num_devices, message):
  config = _config(batch_size=48, eval_batch_size=48, **overrides)
  with pytest.raises(errors.ConfigError, match=message):
    parallel.check(config, num_devices)


@pytest.mark.slow
def test_columns_run_resumes_and_ends_where_a_data_parallel_run_does(tmp_path):
  data = _config(num_train_steps=3, eval_every_steps=3, num_eval_steps=1)
  train.train_and_evaluate(data, str(tmp_path / 'data'))
  columns = _config(num_train_steps=2, eval_every_steps=3, num_eval_steps=1,
                    parallelism='columns')
  train.train_and_evaluate(columns, str(tmp_path / 'columns'))  # stops at step 2 ...
  columns.num_train_steps = 3
  result = train.train_and_evaluate(columns, str(tmp_path / 'columns'))  # ... resumes to 3
  a = conftest.latest_state(str(tmp_path / 'data'), data)
  b = conftest.latest_state(str(tmp_path / 'columns'), columns)
  assert int(a.step) == int(b.step) == 3 and result['eval/num_examples'] > 0
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6),
                         a.params, b.params)


def test_lars_sees_whole_parameters_when_they_are_split():
  """LARS's trust ratio is a norm over a whole weight tensor: with the kernels split over the
  pair ('columns'), the update must still use the norms one device computes."""
  lars = dict(optimizer='lars', lars_trust_coefficient=0.05)
  ref_losses, ref_params = _train(_config(**lars), 1)
  losses, params = _train(_config(parallelism='columns', **lars), 4)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6),
                         ref_params, params)
