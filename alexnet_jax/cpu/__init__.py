"""The optional CPU backend: oneDNN convolutions for XLA:CPU, and the allocator setting.

Nothing outside this package needs to know its inside; the rest of the code uses only:
  onednn_available(), onednn_unavailable_reason(), cpu_has_bf16()  -- can oneDNN run here?
  conv2d(x, kernel, stride, padding)  -- a oneDNN convolution with its gradient (CPU backend)
  keep_freed_memory(), release_freed_memory(), malloc_env()  -- glibc keeps freed memory
  usable_cores()  -- the cores this process may run on
Where oneDNN or a C++ compiler is missing, onednn_available() is False and says why; the
allocator functions import only the standard library, so a command can call them before JAX.
"""

import os

from alexnet_jax.cpu.allocator import keep_freed_memory
from alexnet_jax.cpu.allocator import malloc_env
from alexnet_jax.cpu.allocator import release_freed_memory


def usable_cores() -> int:
  """The cores this process may run on (taskset or a container's cpuset narrow them)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def onednn_available() -> bool:
  """Whether the oneDNN convolution calls are built and registered (builds them once)."""
  from alexnet_jax.cpu import onednn  # pylint: disable=g-import-not-at-top  (imports JAX)
  return onednn.available()


def onednn_unavailable_reason() -> str | None:
  """Why `onednn_available()` is False (None if it is True or was not asked)."""
  from alexnet_jax.cpu import onednn  # pylint: disable=g-import-not-at-top
  return onednn.unavailable_reason()


def cpu_has_bf16() -> bool:
  """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
  from alexnet_jax.cpu import onednn  # pylint: disable=g-import-not-at-top
  return onednn.cpu_has_bf16()


def conv2d(x, kernel, stride: int, padding):
  """Cross-correlation of NHWC `x` with an HWIO `kernel` by oneDNN, differentiable."""
  from alexnet_jax.cpu import onednn  # pylint: disable=g-import-not-at-top
  return onednn.conv2d(x, kernel, stride, padding)


__all__ = ('onednn_available', 'onednn_unavailable_reason', 'cpu_has_bf16', 'conv2d',
           'keep_freed_memory', 'release_freed_memory', 'malloc_env', 'usable_cores')
