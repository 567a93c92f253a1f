"""The oneDNN convolution calls: values and gradients against XLA's convolution and jax.grad."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from alexnet_jax.core import models
from alexnet_jax import errors
from alexnet_jax.core import kernels
from alexnet_jax.cpu import onednn
from alexnet_jax.core import ops
from configs import tiny

# Skipped only where oneDNN or a compiler is not installed (not x86-64 Linux); where both are,
# a failing build fails test_builds_and_registers instead of skipping the rest.
_INSTALLED = (onednn._dnnl_prefix() is not None and  # pylint: disable=protected-access
              shutil.which(os.environ.get('CXX', 'g++')) is not None)
pytestmark = pytest.mark.skipif(not _INSTALLED,
                                reason='oneDNN (requirements.txt) or a C++ compiler is missing')


def test_builds_and_registers():
  assert onednn.available(), onednn.unavailable_reason()


@pytest.fixture(autouse=True)
def _registered():
  # Every test here needs the calls registered, whichever runs first (or alone).
  assert onednn.available(), onednn.unavailable_reason()


def _reference(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('shape', [
    # batch, size, in, out, kernel, stride, padding ((top, bottom), (left, right))
    (3, 27, 48, 128, 5, 1, ((2, 2), (2, 2))),  # conv2, one column
    (2, 13, 256, 384, 3, 1, ((1, 1), (1, 1))),  # conv3
    (2, 35, 3, 96, 11, 4, ((2, 2), (2, 2))),  # conv1's geometry on a small image
    (2, 36, 3, 96, 11, 4, ((2, 2), (2, 2))),  # as at 224: the last input row is not covered
    (2, 10, 5, 7, 3, 2, ((0, 1), (1, 0))),  # odd channels, stride 2, uneven padding
])
def test_values_and_gradients_match_xla(shape):
  b, s, cin, cout, k, stride, padding = shape
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (b, s, s, cin))
  w = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
  ours = jax.jit(lambda x, w: onednn.conv2d(x, w, stride, padding))(x, w)
  ref = _reference(x, w, stride, padding)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  g = jax.random.normal(kg, ref.shape)  # a random cotangent, so no gradient term cancels
  grads = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * g), argnums=(0, 1)))(x, w)
  (dx, dw), (dx_ref, dw_ref) = grads(lambda x, w: onednn.conv2d(x, w, stride, padding)), grads(
      lambda x, w: _reference(x, w, stride, padding))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=2e-4)


def test_a_cap_on_onednn_below_bf16_means_no_native_bf16(monkeypatch):
  """ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) below AVX512-BF16 keeps oneDNN from those
  instructions whatever /proc/cpuinfo says (capped at AVX2, it has no bfloat16 convolution at
  all), so bfloat16 runs choose XLA's convolutions."""
  for name in ('ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA'):
    monkeypatch.delenv(name, raising=False)
  try:
    onednn.cpu_has_bf16.cache_clear()
    native = onednn.cpu_has_bf16()
    for name, cap, expected in [('ONEDNN_MAX_CPU_ISA', 'AVX2', False),
                                ('ONEDNN_MAX_CPU_ISA', 'avx512_core_bf16', native),
                                ('DNNL_MAX_CPU_ISA', 'AVX512_CORE_VNNI', False)]:
      monkeypatch.setenv(name, cap)
      onednn.cpu_has_bf16.cache_clear()
      assert onednn.cpu_has_bf16() == expected, (name, cap)
      monkeypatch.delenv(name)
  finally:
    onednn.cpu_has_bf16.cache_clear()


@pytest.mark.skipif(not onednn.cpu_has_bf16(),
                    reason='no AVX512-BF16/AMX on this CPU, or ONEDNN_MAX_CPU_ISA below them')
@pytest.mark.parametrize('shape', [(3, 27, 48, 128, 5, 1, 2), (2, 36, 3, 96, 11, 4, 2)])
def test_bfloat16_matches_float32_of_the_rounded_operands(shape):
  # bfloat16 in and out: compare with float32 XLA on the same (bfloat16-rounded) inputs; what
  # may differ is the rounding of the result and accumulation order, ~1e-2 relative at most.
  b, s, cin, cout, k, stride, p = shape
  padding = ((p, p), (p, p))
  kx, kw, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (b, s, s, cin)).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  ref = _reference(f32(x), f32(w), stride, padding)
  g = jax.random.normal(kg, ref.shape).astype(jnp.bfloat16)
  y = jax.jit(lambda x, w: onednn.conv2d(x, w, stride, padding))(x, w)
  assert y.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(ref)))
  np.testing.assert_allclose(f32(y), ref, atol=1e-2 * scale)
  dx, dw = jax.jit(jax.vjp(lambda x, w: onednn.conv2d(x, w, stride, padding), x, w)[1])(g)
  dx_ref, dw_ref = jax.vjp(lambda x, w: _reference(x, w, stride, padding), f32(x), f32(w))[1](
      f32(g))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(dx), dx_ref, atol=1e-2 * float(jnp.max(jnp.abs(dx_ref))))
  np.testing.assert_allclose(f32(dw), dw_ref, atol=1e-2 * float(jnp.max(jnp.abs(dw_ref))))


def test_bad_operands_are_refused():
  with pytest.raises(ValueError, match='NHWC'):
    onednn.conv2d(jnp.zeros((5, 5, 2)), jnp.zeros((3, 3, 2, 2)), 1, ((1, 1), (1, 1)))
  with pytest.raises(TypeError, match='one type'):
    onednn.conv2d(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 2), jnp.bfloat16), 1,
                  ((1, 1), (1, 1)))


@pytest.mark.slow
def test_model_gradients_same_with_either_backend():
  config = tiny.get_config()
  config.model = 'paper'
  config.image_size = 67  # conv1..pool5 all non-empty at 67x67.
  x = jax.random.normal(jax.random.key(1), (2, 67, 67, 3)) * 50
  cotangent = jax.random.normal(jax.random.key(2), (2, config.num_classes))
  params = models.init_params(models.create_model(config), jax.random.key(0), 67)
  results = []
  for backend in ('xla', 'onednn'):
    config.conv_backend = backend
    model = models.create_model(config)

    def logits_and_grads(p, model=model):
      logits, vjp = jax.vjp(lambda p: model.apply({'params': p}, x), p)
      return logits, vjp(cotangent)[0]

    results.append(jax.jit(logits_and_grads)(params))
  (y0, g0), (y1, g1) = results
  np.testing.assert_allclose(y0, y1, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(y0))))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6 + 2e-3 * float(jnp.max(jnp.abs(a))))


def test_backend_choice():
  config = tiny.get_config()
  assert kernels.resolve(config).conv_backend == 'onednn'  # the CPU backend here
  config.dtype = 'bfloat16'
  assert kernels.resolve(config).conv_backend == ('onednn' if onednn.cpu_has_bf16() else 'xla')
  config.dtype, config.conv_backend = 'float32', 'xla'
  assert kernels.resolve(config).conv_backend == 'xla'
  # An explicit choice is honoured everywhere or refused: conv1's direct convolution by oneDNN.
  config.conv_backend, config.conv_impl = 'onednn', 'direct'
  assert kernels.resolve(config) == kernels.Kernels('onednn', 'direct', 'split', 'mask', 'custom')
  config.column_impl = 'grouped'
  with pytest.raises(errors.ConfigError, match="column_impl='grouped'"):
    kernels.resolve(config)
  with pytest.raises(ValueError, match='groups=1'):
    ops.conv(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 2, 4)), 1, ((1, 1), (1, 1)), 2, 'onednn')
  with pytest.raises(ValueError, match='explicit padding'):
    ops.conv(jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 4, 4)), 1, 'SAME', 1, 'onednn')


def test_explicit_onednn_off_the_cpu_is_an_error():
  gpu = type('Device', (), {'platform': 'gpu'})()
  config = tiny.get_config()
  assert kernels.resolve(config, [gpu]) == kernels.Kernels('xla', 'direct', 'grouped',
                                                           'reduce_window', 'custom')
  config.conv_backend = 'onednn'
  with pytest.raises(errors.ConfigError, match='CPU backend only'):
    kernels.resolve(config, [gpu])


def test_unavailable_falls_back_to_xla_or_says_why(monkeypatch):
  monkeypatch.setattr(onednn, 'available', lambda: False)
  monkeypatch.setattr(onednn, '_unavailable_reason', 'no C++ compiler (test)')
  config = tiny.get_config()
  assert kernels.resolve(config).conv_backend == 'xla'
  config.conv_backend = 'onednn'
  with pytest.raises(errors.ConfigError, match='no C\\+\\+ compiler'):
    kernels.resolve(config)


def test_build_without_compiler_names_the_problem(monkeypatch, tmp_path):
  monkeypatch.setenv('ALEXNET_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler-here')
  with pytest.raises(RuntimeError, match='C\\+\\+ compiler'):
    onednn._build()  # pylint: disable=protected-access


@pytest.mark.slow
def test_a_damaged_cached_library_is_rebuilt_once(monkeypatch, tmp_path):
  monkeypatch.setenv('ALEXNET_JAX_CACHE', str(tmp_path))
  path = onednn._build()  # pylint: disable=protected-access
  with open(path, 'wb') as f:  # What an interrupted copy or a full disk leaves.
    f.write(b'not a shared library')
  symbols = onednn._built_symbols()  # pylint: disable=protected-access
  assert set(symbols) == set(onednn._TARGETS)  # pylint: disable=protected-access
  assert os.path.getsize(path) > 10_000


def test_cache_key_covers_compiler_and_platform(monkeypatch):
  key = onednn._cache_key  # pylint: disable=protected-access
  cxx = shutil.which('g++')
  base = key(cxx, ['-O2'], '/lib')
  assert key(cxx, ['-O2'], '/lib') == base
  monkeypatch.setattr(onednn.platform, 'machine', lambda: 'riscv64')
  assert key(cxx, ['-O2'], '/lib') != base
  monkeypatch.undo()
  fake = onednn.subprocess.CompletedProcess([], 0, stdout='g++ 99.0', stderr='')
  monkeypatch.setattr(onednn.subprocess, 'run', lambda *a, **k: fake)
  assert key(cxx, ['-O2'], '/lib') != base
