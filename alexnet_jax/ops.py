"""Low-level array operations of the network, kept apart so that faster forms can be swapped in.

Everything here is a pure function of arrays in NHWC layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

POOL_IMPLS = ('auto', 'reduce_window')


def channel_window_sum(x: jax.Array, n: int) -> jax.Array:
  """sum_{j=max(0,i-n//2)}^{min(C-1,i+n//2)} x[..., j] for every channel i.

  Zero padding at both ends is the paper's clipped window (§3.3 sum limits).
  """
  half = n // 2
  return lax.reduce_window(x, 0.0, lax.add, (1,) * (x.ndim - 1) + (n,), (1,) * x.ndim,
                           [(0, 0)] * (x.ndim - 1) + [(half, half)])


def max_pool(x: jax.Array, window: int, stride: int, impl: str = 'auto') -> jax.Array:
  """Max-pooling over `window` x `window` patches with `stride`, no padding (NHWC)."""
  if impl not in POOL_IMPLS:
    raise ValueError(f'pool_impl must be one of {POOL_IMPLS}, got {impl!r}')
  # A Python -inf (not an array) lets JAX recognise the max monoid and differentiate it.
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           'VALID')
