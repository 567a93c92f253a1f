"""Tests of alexnet_jax/models.py against the paper's numbers and independent NumPy computations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.core import models
from alexnet_jax.core.kernels import Kernels

import conftest


def _config(**overrides):
  return conftest.config('alexnet', **overrides)


def _abstract_params(model, size):
  return jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), size))


@pytest.mark.parametrize('variant,expected', [
    ('paper', 60_965_224), ('one_column', 62_378_344), ('owt', 61_100_840)])
def test_parameter_counts_match_the_paper_and_torchvision(variant, expected):
  model = models.create_model(_config(model=variant))
  assert models.count_params(_abstract_params(model, 224)) == expected


def test_paper_feature_map_sizes():
  shapes = models.intermediate_shapes(models.create_model(_config()), 224, batch=2)
  # §3.5 / Figure 2: 55-27-27-13-13-13-13-6.
  assert shapes['conv1_out'] == (2, 55, 55, 96)
  assert shapes['pool1'] == (2, 27, 27, 96)
  assert shapes['conv2_out'] == (2, 27, 27, 256)
  assert shapes['pool2'] == (2, 13, 13, 256)
  assert shapes['conv3_out'] == (2, 13, 13, 384)
  assert shapes['conv4_out'] == (2, 13, 13, 384)
  assert shapes['conv5_out'] == (2, 13, 13, 256)
  assert shapes['pool5'] == (2, 6, 6, 256)
  assert shapes['fc6_out'] == shapes['fc7_out'] == (2, 4096)


def test_non_overlapping_pooling_keeps_the_feature_map_sizes():
  shapes = models.intermediate_shapes(
      models.create_model(_config(overlapping_pool=False)), 224)
  assert [shapes[k][1] for k in ('pool1', 'pool2', 'pool5')] == [27, 13, 6]


def test_paper_kernel_shapes_show_the_two_columns():
  params = _abstract_params(models.create_model(_config()), 224)
  # conv2/4/5 see half of their input channels; conv3 and the FC layers see everything.
  assert params['conv1']['kernel'].shape == (11, 11, 3, 96)
  assert params['conv2']['kernel'].shape == (5, 5, 48, 256)
  assert params['conv3']['kernel'].shape == (3, 3, 256, 384)
  assert params['conv4']['kernel'].shape == (3, 3, 192, 384)
  assert params['conv5']['kernel'].shape == (3, 3, 192, 256)
  assert params['fc6']['kernel'].shape == (9216, 4096)
  assert params['fc8']['kernel'].shape == (4096, 1000)


@pytest.mark.slow
def test_small_variant_runs_on_32x32_and_28x28():
  model = models.create_model(_config(model='small', num_classes=10))
  assert models.intermediate_shapes(model, 32)['pool5'] == (1, 3, 3, 64)
  assert models.intermediate_shapes(model, 28)['pool5'] == (1, 2, 2, 64)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3)) * 50
  params = models.init_params(model, jax.random.key(0), 32)
  logits = model.apply({'params': params}, x)
  assert logits.shape == (3, 10) and np.all(np.isfinite(logits))


def _lrn_numpy(a, k, n, alpha, beta):
  """§3.3 written as loops over channels, with the clipped window of the paper's sum limits."""
  out = np.empty_like(a)
  channels = a.shape[-1]
  for i in range(channels):
    lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
    s = np.zeros(a.shape[:-1])
    for j in range(lo, hi + 1):
      s += a[..., j] ** 2
    out[..., i] = a[..., i] / (k + alpha * s) ** beta
  return out


@pytest.mark.parametrize('convention,n', [('paper', 5), ('divided', 5), ('paper', 3)])
def test_lrn_matches_the_paper_formula(convention, n):
  rng = np.random.default_rng(0)
  # Large activations so that the alpha * sum term matters (it is ~1e-4 * a^2).
  a = rng.normal(0, 60, (2, 4, 3, 11)).astype(np.float32)
  k, alpha, beta = 2.0, 1e-4, 0.75
  got = np.asarray(models.local_response_norm(jnp.asarray(a), k=k, n=n, alpha=alpha, beta=beta,
                                              alpha_convention=convention))
  want = _lrn_numpy(a.astype(np.float64), k, n, alpha / n if convention == 'divided' else alpha,
                    beta)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
  # The first and last channels use the clipped window: they differ from a wrap-around window.
  assert not np.allclose(want[..., 0], a[..., 0] / (k + alpha * (a[..., :3] ** 2).sum(-1)
                                                   + alpha * (a[..., -2:] ** 2).sum(-1)) ** beta)
  # The module form is the same function.
  module = models.LocalResponseNorm(k=k, n=n, alpha=alpha, beta=beta, alpha_convention=convention)
  np.testing.assert_allclose(np.asarray(module.apply({}, jnp.asarray(a))), got, rtol=1e-6)


def test_lrn_divided_convention_equals_paper_with_alpha_times_n():
  a = jnp.asarray(np.random.default_rng(1).normal(0, 80, (1, 2, 2, 8)), jnp.float32)
  np.testing.assert_allclose(
      models.local_response_norm(a, alpha=5e-4, alpha_convention='divided'),
      models.local_response_norm(a, alpha=1e-4, alpha_convention='paper'), rtol=1e-6)


def test_lrn_rejects_bad_arguments():
  with pytest.raises(ValueError, match='alpha_convention'):
    models.local_response_norm(jnp.ones((1, 1, 1, 4)), alpha_convention='torch')
  with pytest.raises(ValueError, match='odd'):
    models.local_response_norm(jnp.ones((1, 1, 1, 4)), n=4)


def _conv_numpy(x, w, stride, pad):
  """Direct cross-correlation, NHWC x HWIO, as loops over output positions."""
  x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw, _, cout = w.shape
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, cout))
  for i, j in itertools.product(range(oh), range(ow)):
    patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
    out[:, i, j, :] = np.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
  return out


@pytest.mark.parametrize('impl', ['split', 'grouped'])
def test_column_conv_equals_two_independent_convolutions(impl):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 7, 6, 8)).astype(np.float32)
  layer = models.ColumnConv(6, 3, strides=1, padding=((1, 1), (1, 1)), columns=2,
                            kernels=Kernels(column_impl=impl),
                            bias_init=jax.nn.initializers.normal(1.0))
  variables = layer.init(jax.random.key(0), jnp.asarray(x))
  w = np.asarray(variables['params']['kernel'], np.float64)
  b = np.asarray(variables['params']['bias'], np.float64)
  assert w.shape == (3, 3, 4, 6)
  got = np.asarray(layer.apply(variables, jnp.asarray(x)))
  pad = ((1, 1), (1, 1))
  want = np.concatenate([_conv_numpy(x[..., :4], w[..., :3], 1, pad),
                         _conv_numpy(x[..., 4:], w[..., 3:], 1, pad)], axis=-1) + b
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_perturbing_one_column_of_conv2_changes_only_that_column():
  model = models.create_model(_config())
  params = _abstract_params(model, 224)['conv2']
  params = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.key(3), p.shape, p.dtype), params)
  layer = models.ColumnConv(256, 5, 1, ((2, 2), (2, 2)), columns=2)
  x = jax.random.normal(jax.random.key(4), (1, 27, 27, 96))
  y0 = layer.apply({'params': params}, x)
  # Change only the channels of the first column (0..47).
  y1 = layer.apply({'params': params}, x.at[..., :48].add(1.0))
  changed = np.abs(np.asarray(y1 - y0)).max(axis=(0, 1, 2)) > 0
  assert changed[:128].all() and not changed[128:].any()
  # And the second column's inputs reach only the second column's outputs.
  y2 = layer.apply({'params': params}, x.at[..., 48:].add(1.0))
  changed = np.abs(np.asarray(y2 - y0)).max(axis=(0, 1, 2)) > 0
  assert changed[128:].all() and not changed[:128].any()


@pytest.mark.parametrize('within', [True, False])
def test_lrn_keeps_each_column_to_itself_until_conv3(within):
  """§3.2: with lrn_within_columns, changing column 1's conv1 kernels changes nothing of column 2
  up to conv3's input (pool2); with the window crossing (Caffe, torchvision), it leaks."""
  config = _config(model='small', num_classes=10, lrn_within_columns=within)
  model = models.create_model(config, Kernels())
  params = models.init_params(model, jax.random.key(0), 32)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 60.0
  c1, c2 = 16, 32  # the small net's conv1 (32) and conv2 (64) channels of one column

  def stages(p):
    _, state = model.apply({'params': p}, x, mutable=['intermediates'])
    return {k: np.asarray(v[0]) for k, v in state['intermediates'].items()}

  before = stages(params)
  kernel = params['conv1']['kernel']
  perturbed = dict(params, conv1=dict(params['conv1'],
                                      kernel=kernel.at[..., :c1].multiply(3.0)))
  after = stages(perturbed)
  assert not np.array_equal(before['pool1'][..., :c1], after['pool1'][..., :c1])
  assert np.array_equal(before['conv1_out'][..., c1:], after['conv1_out'][..., c1:])
  other = [np.array_equal(before['pool1'][..., c1:], after['pool1'][..., c1:]),
           np.array_equal(before['conv2_out'][..., c2:], after['conv2_out'][..., c2:]),
           np.array_equal(before['pool2'][..., c2:], after['pool2'][..., c2:])]
  assert all(other) if within else not any(other)


@pytest.fixture(scope='module')
def paper_model_and_params():
  model = models.create_model(_config())
  params = models.init_params(model, jax.random.key(0), 224)
  images = jax.random.normal(jax.random.key(5), (2, 224, 224, 3)) * 60.0
  return model, params, images


def test_paper_initialisation_statistics(paper_model_and_params):
  _, params, _ = paper_model_and_params
  for name, layer in params.items():
    w = np.asarray(layer['kernel'])
    # §5: every weight N(0, 0.01); the tolerance is a few standard errors for the smallest layer.
    assert abs(w.mean()) < 5 * 0.01 / np.sqrt(w.size), name
    assert abs(w.std() - 0.01) < 0.01 * 5 / np.sqrt(2 * w.size), name
    bias = np.asarray(layer['bias'])
    # §5: biases 1 in conv2, conv4, conv5 and the hidden FC layers, 0 elsewhere.
    want = 1.0 if name in ('conv2', 'conv4', 'conv5', 'fc6', 'fc7') else 0.0
    np.testing.assert_array_equal(bias, want, err_msg=name)
  caffe = models.init_params(models.create_model(_config(bias_init_one=0.1, model='small',
                                                         num_classes=10)),
                             jax.random.key(0), 32)
  np.testing.assert_allclose(caffe['conv2']['bias'], 0.1)
  np.testing.assert_allclose(caffe['conv3']['bias'], 0.0)


def test_eval_is_deterministic_and_dropout_is_not(paper_model_and_params):
  model, params, images = paper_model_and_params
  apply = jax.jit(model.apply, static_argnames='train')
  # Dropout is off at evaluation: different dropout keys give the very same logits...
  a = apply({'params': params}, images, train=False, rngs={'dropout': jax.random.key(1)})
  b = apply({'params': params}, images, train=False, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2, 1000) and np.isfinite(a).all()
  # ...and a network without dropout gives them in training mode too (§4.2: at test time the
  # outputs are not scaled; inverted dropout scales during training instead).
  plain = models.create_model(_config(dropout_rate=0.0))
  c = jax.jit(plain.apply, static_argnames='train')({'params': params}, images, train=True,
                                                     rngs={'dropout': jax.random.key(1)})
  np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))
  d1 = apply({'params': params}, images, train=True, rngs={'dropout': jax.random.key(1)})
  d2 = apply({'params': params}, images, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(d1, d2)


def test_fc7_features_feed_fc8(paper_model_and_params):
  model, params, images = paper_model_and_params
  features = models.fc7_features(model, params, images)
  assert features.shape == (2, 4096) and (np.asarray(features) >= 0).all()
  logits = model.apply({'params': params}, images)
  np.testing.assert_allclose(features @ params['fc8']['kernel'] + params['fc8']['bias'], logits,
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_is_finite_and_close_to_float32(paper_model_and_params):
  _, params, images = paper_model_and_params
  f32 = models.create_model(_config()).apply({'params': params}, images)
  bf16_model = models.create_model(_config(dtype='bfloat16'))
  bf16 = bf16_model.apply({'params': params}, images)
  assert bf16.dtype == jnp.float32 and np.isfinite(bf16).all()
  rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
  assert rel < 0.05, rel
  # Parameters stay float32 when initialised for a bfloat16 model.
  p = _abstract_params(bf16_model, 224)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))


def test_split_and_grouped_columns_give_the_same_network():
  small = _config(model='small', num_classes=10)
  x = jax.random.normal(jax.random.key(6), (4, 32, 32, 3)) * 60.0
  params = models.init_params(models.create_model(small), jax.random.key(0), 32)
  outs = []
  for impl in ('split', 'grouped'):
    outs.append(models.create_model(small, Kernels(column_impl=impl)).apply({'params': params},
                                                                           x))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def _maxpool_numpy(a, window, stride):
  n = (a.shape[1] - window) // stride + 1
  m = (a.shape[2] - window) // stride + 1
  out = np.empty((a.shape[0], n, m, a.shape[3]), a.dtype)
  for i, j in itertools.product(range(n), range(m)):
    out[:, i, j] = a[:, i * stride:i * stride + window, j * stride:j * stride + window].max((1, 2))
  return out


@pytest.mark.parametrize('lrn,overlap,within', [(True, True, True), (True, True, False),
                                                (False, False, True)])
def test_lrn_and_pooling_switches(lrn, overlap, within):
  model = models.create_model(_config(model='small', num_classes=10, lrn=lrn,
                                      overlapping_pool=overlap, lrn_within_columns=within))
  x = jax.random.normal(jax.random.key(7), (2, 32, 32, 3)) * 60.0
  params = models.init_params(model, jax.random.key(0), 32)
  _, state = model.apply({'params': params}, x, mutable=['intermediates'])
  act = np.asarray(state['intermediates']['conv1_out'][0], np.float64)
  if lrn and within:  # each column's 16 channels on their own (§3.2)
    act = np.concatenate([_lrn_numpy(h, 2.0, 5, 1e-4, 0.75) for h in np.split(act, 2, -1)], -1)
  elif lrn:
    act = _lrn_numpy(act, 2.0, 5, 1e-4, 0.75)
  want = _maxpool_numpy(act, *((3, 2) if overlap else (2, 2)))
  np.testing.assert_allclose(state['intermediates']['pool1'][0], want, rtol=1e-5, atol=1e-5)


def test_tanh_activation_is_used():
  model = models.create_model(_config(model='small', num_classes=10, activation='tanh'))
  x = jax.random.normal(jax.random.key(8), (2, 32, 32, 3)) * 60.0
  params = models.init_params(model, jax.random.key(0), 32)
  _, state = model.apply({'params': params}, x, mutable=['intermediates'])
  act = np.asarray(state['intermediates']['conv1_out'][0])
  assert act.min() < 0 and np.abs(act).max() <= 1.0


def test_owt_adaptive_pool_averages_torchvision_bins():
  x = jnp.arange(2 * 13 * 13 * 1, dtype=jnp.float32).reshape(2, 13, 13, 1)
  got = np.asarray(models.adaptive_avg_pool(x, 6))
  xn = np.asarray(x)
  for i, j in itertools.product(range(6), range(6)):
    r0, r1 = (i * 13) // 6, int(np.ceil((i + 1) * 13 / 6))
    c0, c1 = (j * 13) // 6, int(np.ceil((j + 1) * 13 / 6))
    np.testing.assert_allclose(got[:, i, j], xn[:, r0:r1, c0:c1].mean((1, 2)))
