"""Low-level array operations of the network, in faster forms where XLA's defaults are slow.

Everything here is a pure function of NHWC arrays. Each fast form has a plain reference form
(the obvious JAX expression) that the tests compare it with, values and gradients alike, and an
`impl` switch; which form a run uses is decided once, before tracing, by `kernels.resolve`.
Measured on XLA:CPU, batch 128, paper layer sizes (BENCHMARKS.md has the commands): see each
function's docstring.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax import cpu

POOL_IMPLS = ('reduce_window', 'mask')
LRN_IMPLS = ('reduce_window', 'custom')
CONV_IMPLS = ('direct', 'im2col')
CONV_BACKENDS = ('xla', 'onednn')


# ---------------------------------------------------------------------------------------------
# Sum over a window of channels (LRN's denominator).


def channel_window_sum(x: jax.Array, n: int) -> jax.Array:
  """sum_{j=max(0,i-n//2)}^{min(C-1,i+n//2)} x[..., j] for every channel i (reduce_window).

  Zero padding at both ends is the paper's clipped window (§3.3 sum limits).
  """
  half = n // 2
  return lax.reduce_window(x, 0.0, lax.add, (1,) * (x.ndim - 1) + (n,), (1,) * x.ndim,
                           [(0, 0)] * (x.ndim - 1) + [(half, half)])


def _shifted_window_sum(x: jax.Array, n: int) -> jax.Array:
  """channel_window_sum as n shifted slices of a zero-padded copy: one fused elementwise loop."""
  half = n // 2
  c = x.shape[-1]
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)])
  return sum(lax.slice_in_dim(padded, i, i + c, axis=-1) for i in range(n))


def _neg_pow(d: jax.Array, beta: float) -> jax.Array:
  """d ** -beta; the paper's beta = 0.75 as rsqrt(d) * rsqrt(sqrt(d)), cheaper than exp/log."""
  if beta == 0.75:
    return lax.rsqrt(d) * lax.rsqrt(lax.sqrt(d))
  return d ** (-beta)


# ---------------------------------------------------------------------------------------------
# Local Response Normalization (§3.3).


def lrn_reference(x: jax.Array, k: float, n: int, alpha: float, beta: float) -> jax.Array:
  """b = x / (k + alpha * window_sum(x^2))^beta, written plainly; autodiff gives its gradient."""
  return x * (k + alpha * channel_window_sum(jnp.square(x), n)) ** (-beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def lrn_custom(x: jax.Array, k: float, n: int, alpha: float, beta: float) -> jax.Array:
  """lrn_reference with a hand-written gradient (same values, fewer passes over memory).

  With d_i = k + alpha * sum_{j in W(i)} x_j^2 and b_i = x_i d_i^-beta:
    dL/dx_j = g_j d_j^-beta - 2 alpha beta x_j sum_{i in W(j)} g_i x_i d_i^(-beta-1)
  (the window W is symmetric, so the same window sum serves both directions). Autodiff of the
  plain form keeps more intermediates and transposes the reduce_window; this measured ~3x faster
  forward+backward on XLA:CPU for conv1's LRN.
  """
  return _lrn_fwd(x, k, n, alpha, beta)[0]


def _lrn_fwd(x, k, n, alpha, beta):
  d = k + alpha * _shifted_window_sum(jnp.square(x), n)
  return x * _neg_pow(d, beta), (x, d)


def _lrn_bwd(k, n, alpha, beta, res, g):
  del k
  x, d = res
  inv = _neg_pow(d, beta)
  s = _shifted_window_sum(g * x * inv / d, n)
  return (g * inv - (2.0 * alpha * beta) * x * s,)


lrn_custom.defvjp(_lrn_fwd, _lrn_bwd)


def lrn(x: jax.Array, k: float, n: int, alpha: float, beta: float, impl: str = 'custom',
        groups: int = 1) -> jax.Array:
  """Local Response Normalization across the last axis, alpha as written (see models.py).

  groups > 1 splits the channels into that many consecutive groups and normalises each on its
  own: the window is clipped at every group's first and last channel, as at the ends of the
  axis, so no group reads another's activity (the paper's columns, §3.2). Both forms honour it,
  values and gradients: the split is a reshape around them.
  """
  if impl not in LRN_IMPLS:
    raise ValueError(f'lrn_impl must be one of {LRN_IMPLS}, got {impl!r}')
  if groups > 1:
    c = x.shape[-1]
    if c % groups:
      raise ValueError(f'{c} channels do not split into {groups} LRN groups')
    y = lrn(x.reshape(x.shape[:-1] + (groups, c // groups)), k, n, alpha, beta, impl)
    return y.reshape(x.shape)
  if impl == 'reduce_window':
    return lrn_reference(x, k, n, alpha, beta)
  return lrn_custom(x, k, n, alpha, beta)


# ---------------------------------------------------------------------------------------------
# Max-pooling (§3.4).


def max_pool_reference(x: jax.Array, window: int, stride: int) -> jax.Array:
  """XLA's reduce_window max; its gradient is XLA's select-and-scatter."""
  # A Python -inf (not an array) lets JAX recognise the max monoid and differentiate it.
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           'VALID')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_mask(x: jax.Array, window: int, stride: int) -> jax.Array:
  """max_pool_reference with a gradient built from comparison masks instead of a scatter.

  The gradient of each output goes to the first (row-major) input of its window that equals
  the maximum, as select-and-scatter does; for each of the window*window offsets, a strided
  slice of the input is compared with the output and the masked gradient is padded back into
  place, all elementwise ops that XLA fuses. On XLA:CPU select-and-scatter took 13x the forward
  pass for pool1; this form measured several times faster (BENCHMARKS.md).
  """
  return max_pool_reference(x, window, stride)


def _pool_fwd(x, window, stride):
  y = max_pool_reference(x, window, stride)
  return y, (x, y)


def _pool_bwd(window, stride, res, g):
  x, y = res
  b, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  # Overlapping windows add up to 4 gradients per input: summed in float32 whatever g's type
  # (in bfloat16 every partial sum would round, and XLA:CPU converts around each add anyway).
  out_dtype, g = g.dtype, g.astype(jnp.float32)
  dx = jnp.zeros(x.shape, jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  for di in range(window):
    for dj in range(window):
      end_h, end_w = di + stride * (ho - 1) + 1, dj + stride * (wo - 1) + 1
      xs = lax.slice(x, (0, di, dj, 0), (b, end_h, end_w, c), (1, stride, stride, 1))
      hit = (xs == y) & ~taken
      taken = taken | hit
      dx = dx + lax.pad(jnp.where(hit, g, zero), zero,
                        [(0, 0, 0), (di, h - end_h, stride - 1), (dj, w - end_w, stride - 1),
                         (0, 0, 0)])
  return (dx.astype(out_dtype),)


max_pool_mask.defvjp(_pool_fwd, _pool_bwd)


def max_pool(x: jax.Array, window: int, stride: int, impl: str = 'reduce_window') -> jax.Array:
  """Max-pooling over `window` x `window` patches with `stride`, no padding (NHWC).

  impl: 'reduce_window' (XLA's own gradient) or 'mask' (the scatter-free gradient, faster on
  XLA:CPU; GPU/TPU pooling backward is a native kernel).
  """
  if impl not in POOL_IMPLS:
    raise ValueError(f'pool_impl must be one of {POOL_IMPLS}, got {impl!r}')
  if impl == 'mask':
    return max_pool_mask(x, window, stride)
  return max_pool_reference(x, window, stride)


# ---------------------------------------------------------------------------------------------
# Convolutions: XLA's or oneDNN's; conv1's strided convolution (11x11, stride 4, on 3 channels).


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding, groups: int = 1,
         backend: str = 'xla') -> jax.Array:
  """Cross-correlation of NHWC `x` with an HWIO `kernel`, by XLA or (ungrouped) by oneDNN.

  backend='onednn' needs the CPU backend, explicit ((top, bottom), (left, right)) padding and
  groups=1 (the calls are ungrouped): anything else is an error, not a silent fallback.
  """
  if backend not in CONV_BACKENDS:
    raise ValueError(f'conv backend must be one of {CONV_BACKENDS}, got {backend!r}')
  if backend == 'onednn':
    if groups != 1 or isinstance(padding, str):
      raise ValueError(f'the oneDNN convolution takes groups=1 and explicit padding pairs, not '
                       f'groups={groups}, padding={padding!r}')
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    return cpu.conv2d(x, kernel, stride, pairs)
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  feature_group_count=groups)


def _space_to_depth_patches(x: jax.Array, kernel_shape: tuple, s: int, padding
                            ) -> jax.Array:
  """The patches a strided convolution reads, built from s x s blocks of pixels.

  The padded input is cut into s x s blocks whose pixels become channels (s*s*C of them); the
  patch of an output pixel is then the ceil(k/s) x ceil(k/s) blocks at its position: slices,
  not gathers. Taps beyond the kernel's k x k are matched by zero rows of `_blocked_kernel`.
  """
  kh, kw, cin, _ = kernel_shape
  (pt, pb), (pl, pr) = padding
  h, w = x.shape[1] + pt + pb, x.shape[2] + pl + pr
  out_h, out_w = (h - kh) // s + 1, (w - kw) // s + 1
  hb, wb = math.ceil(h / s), math.ceil(w / s)
  x = jnp.pad(x, ((0, 0), (pt, pb + hb * s - h), (pl, pr + wb * s - w), (0, 0)))
  b = x.shape[0]
  x = x.reshape(b, hb, s, wb, s, cin).transpose(0, 1, 3, 2, 4, 5).reshape(b, hb, wb, s * s * cin)
  return jnp.concatenate([x[:, i:i + out_h, j:j + out_w, :]
                          for i in range(math.ceil(kh / s)) for j in range(math.ceil(kw / s))],
                         axis=-1)


def _blocked_kernel(kernel: jax.Array, s: int) -> jax.Array:
  """The HWIO kernel as a matrix whose rows follow `_space_to_depth_patches`' channels."""
  kh, kw, cin, cout = kernel.shape
  khb, kwb = math.ceil(kh / s), math.ceil(kw / s)
  kernel = jnp.pad(kernel, ((0, khb * s - kh), (0, kwb * s - kw), (0, 0), (0, 0)))
  kernel = kernel.reshape(khb, s, kwb, s, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  return kernel.reshape(khb * kwb * s * s * cin, cout)


def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
  """A strided convolution as one matrix product of explicit patches with the kernel.

  For conv1 (11x11/4 on 3 channels) XLA:CPU's own convolution computes the kernel gradient
  slowly (about 3x its forward time); as a matrix product the gradient is another matrix
  product of the same patches. The patches come from 4x4 pixel blocks (12x12 taps, 19% more
  multiply-adds than 11x11) so that building them is slicing, not gathering. Forward and
  kernel gradient together measured about 2x faster than the direct form (BENCHMARKS.md).
  """
  patches = _space_to_depth_patches(x, kernel.shape, stride, padding)
  return jnp.einsum('bhwk,ko->bhwo', patches, _blocked_kernel(kernel, stride))


def strided_conv(x: jax.Array, kernel: jax.Array, stride: int, padding, impl: str = 'direct',
                 backend: str = 'xla') -> jax.Array:
  """A convolution with stride > 1: 'direct' (a convolution, by `backend`) or 'im2col' (a
  matrix product of explicit patches, `conv_im2col`, which needs explicit padding pairs)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  if impl == 'im2col':
    if isinstance(padding, str):
      raise ValueError(f'conv_impl=im2col takes explicit padding pairs, not {padding!r}')
    return conv_im2col(x, kernel, stride, padding)
  return conv(x, kernel, stride, padding, backend=backend)
