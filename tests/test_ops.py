"""The fast forms in alexnet_jax/ops.py against their plain forms: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.core import ops


def _relu_input(shape, seed=0):
  """ReLU outputs: many exact zeros, so max-pool windows have ties."""
  x = jax.random.normal(jax.random.key(seed), shape) * 30
  return jax.nn.relu(x)


def _grads(f, *args):
  """Gradient of a random projection of f's output (exercises every output's cotangent), as one
  jitted program (op by op, each operation is compiled apart: seconds per case)."""
  proj = jax.random.normal(jax.random.key(42), jax.eval_shape(f, *args).shape)
  return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * proj),
                          argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize('window,stride,size', [(3, 2, 55), (3, 2, 13), (2, 2, 27), (3, 2, 8)])
def test_mask_max_pool_matches_select_and_scatter(window, stride, size):
  x = _relu_input((2, size, size + 1, 5))
  x = x.at[:, :4, :4, :].set(7.0)  # A block of exact non-zero ties too.
  ref = ops.max_pool_reference(x, window, stride)
  got = ops.max_pool_mask(x, window, stride)
  np.testing.assert_array_equal(got, ref)
  (g_ref,) = _grads(lambda a: ops.max_pool_reference(a, window, stride), x)
  (g_got,) = _grads(lambda a: ops.max_pool_mask(a, window, stride), x)
  # Same tie-breaking (the first maximum of each window gets the gradient): exactly equal.
  np.testing.assert_allclose(g_got, g_ref, rtol=1e-6, atol=1e-6)


def test_mask_max_pool_gradient_in_bfloat16_is_the_float32_one_rounded_once():
  x = _relu_input((2, 13, 13, 4)).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(7), (2, 6, 6, 4)).astype(jnp.bfloat16)
  dx = jax.vjp(lambda a: ops.max_pool_mask(a, 3, 2), x)[1](g)[0]
  assert dx.dtype == jnp.bfloat16
  dx32 = jax.vjp(lambda a: ops.max_pool_reference(a, 3, 2), x.astype(jnp.float32))[1](
      g.astype(jnp.float32))[0]
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(dx32.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize('n,beta', [(5, 0.75), (3, 0.5)])
def test_custom_lrn_matches_the_plain_form_and_its_autodiff(n, beta):
  x = jax.random.normal(jax.random.key(1), (2, 6, 5, 13)) * 80
  args = dict(k=2.0, n=n, alpha=1e-4, beta=beta)
  ref = ops.lrn_reference(x, **args)
  got = ops.lrn_custom(x, 2.0, n, 1e-4, beta)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  (g_ref,) = _grads(lambda a: ops.lrn_reference(a, **args), x)
  (g_got,) = _grads(lambda a: ops.lrn_custom(a, 2.0, n, 1e-4, beta), x)
  np.testing.assert_allclose(g_got, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kernel,stride,pad,size', [
    (11, 4, 2, 224),  # conv1 of the paper network
    (11, 4, 2, 67),
    (5, 2, 1, 20),
    (3, 3, 0, 10),
])
def test_im2col_conv_matches_xla_convolution(kernel, stride, pad, size):
  x = jax.random.normal(jax.random.key(2), (2, size, size, 3)) * 50
  w = jax.random.normal(jax.random.key(3), (kernel, kernel, 3, 8)) * 0.01
  padding = ((pad, pad), (pad, pad))
  ref = ops.conv(x, w, stride, padding)
  got = ops.conv_im2col(x, w, stride, padding)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
  g_ref = _grads(lambda a, b: ops.conv(a, b, stride, padding), x, w)
  g_got = _grads(lambda a, b: ops.conv_im2col(a, b, stride, padding), x, w)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * float(jnp.abs(b).max()))


def test_conv1_im2col_keeps_the_papers_55x55_map():
  x = jnp.zeros((1, 224, 224, 3))
  w = jnp.zeros((11, 11, 3, 96))
  assert ops.strided_conv(x, w, 4, ((2, 2), (2, 2)), impl='im2col').shape == (1, 55, 55, 96)


@pytest.mark.parametrize('fn,kwargs', [
    (ops.max_pool, dict(window=3, stride=2)),
    (ops.lrn, dict(k=2.0, n=5, alpha=1e-4, beta=0.75)),
])
def test_unknown_impl_is_named(fn, kwargs):
  with pytest.raises(ValueError, match='impl'):
    fn(jnp.ones((1, 5, 5, 4)), impl='fast', **kwargs)
  with pytest.raises(ValueError, match='conv_impl'):
    ops.strided_conv(jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 2)), 2, ((0, 0), (0, 0)), 'x')


@pytest.mark.parametrize('impl', ['reduce_window', 'custom'])
def test_grouped_lrn_is_each_group_on_its_own(impl):
  """groups=2 equals LRN of each half separately, values and gradients, in both forms."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 12)) * 40
  g = jax.random.normal(jax.random.key(1), x.shape)
  args = (2.0, 5, 1e-4, 0.75)
  halves = lambda x: jnp.concatenate([ops.lrn_reference(h, *args) for h in jnp.split(x, 2, -1)],
                                     -1)
  grouped = lambda x: ops.lrn(x, *args, impl=impl, groups=2)
  np.testing.assert_allclose(grouped(x), halves(x), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(grouped(x) * g))(x),
                             jax.grad(lambda x: jnp.sum(halves(x) * g))(x), rtol=1e-5, atol=1e-7)
  # The window no longer crosses: channel 5's output ignores channel 6, unlike groups=1.
  bump = x.at[..., 6].add(10.0)
  assert np.array_equal(grouped(bump)[..., 5], grouped(x)[..., 5])
  assert not np.array_equal(ops.lrn(bump, *args, impl=impl)[..., 5],
                            ops.lrn(x, *args, impl=impl)[..., 5])
