"""Host process settings that make XLA:CPU steps faster: glibc keeps freed memory for reuse.

XLA:CPU allocates a step's temporaries afresh on every execution. glibc serves each allocation
above 32 MiB with its own mmap and unmaps it on free, so every training step of the paper's
network at batch 128 faulted in about 3.3 GB of new, zeroed pages: ~840,000 minor page faults
and ~2 s of kernel time per step on a 2-core machine. `keep_freed_memory` has glibc serve every
allocation from one heap (one arena, no mmap) that it never gives back, so from the second step
on a step reuses the memory of the one before and takes no page faults at all (measured with
getrusage: 837,010 -> 0 faults per step; see BENCHMARKS.md for the step time).

The price: the process's resident memory never shrinks below its peak, which a training
process reaches in its first step anyway. A single arena also makes threads share one malloc
lock; the input pipeline's throughput with it is in BENCHMARKS.md.

It must run before the threads that allocate exist (XLA's and tf.data's pools): call it first
thing in a command, before JAX or TensorFlow start. This module imports only the standard
library for that reason. It does nothing where the C library is not glibc, nor where JAX will
compute on a GPU/TPU (a plugin installed and JAX_PLATFORMS not naming cpu first): there the
host only feeds the input pipeline, and the page faults it would save are not on the host.
"""

import ctypes
import importlib.util
import os
import platform
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1  # Free memory at the top of the heap above this is returned; -1: never.
_M_TOP_PAD = -2  # Extra bytes asked of the kernel each time the heap grows.
_M_MMAP_MAX = -4  # How many allocations may be served by mmap at once; 0: none.
_M_ARENA_MAX = -8  # How many arenas threads may spread over; 1: the main (brk) heap only.

_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
             (_M_TOP_PAD, 256 << 20))

_applied = False


def jax_computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, told without starting JAX: JAX_PLATFORMS if set,
  else whether a GPU/TPU plugin (a `jax_plugins` package, or libtpu) is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def keep_freed_memory() -> bool:
  """Has glibc keep and reuse freed memory (see the module docstring). Returns whether it did.

  Idempotent. Returns False, changing nothing, where the C library is not glibc or JAX will
  not compute on the CPU.
  """
  global _applied
  if _applied:
    return True
  if (not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc' or
      not jax_computes_on_cpu()):
    return False
  libc = ctypes.CDLL(None)
  mallopt = getattr(libc, 'mallopt', None)
  if mallopt is None:
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  for param, value in _SETTINGS:
    if mallopt(param, value) != 1:
      raise RuntimeError(f'glibc mallopt({param}, {value}) was refused')
  _applied = True
  return True


def release_freed_memory() -> None:
  """Gives the memory glibc kept back to the kernel now (malloc_trim), e.g. before starting
  another memory-hungry process; later allocations fault their pages in again."""
  if _applied:
    libc = ctypes.CDLL(None)
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim(0)


def malloc_env() -> dict[str, str]:
  """The environment variables that give another (non-Python-controlled) process the same
  settings at its start, e.g. the PyTorch peer in a like-for-like comparison."""
  return {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0',
          'MALLOC_TRIM_THRESHOLD_': str(2**62), 'MALLOC_TOP_PAD_': str(256 << 20)}
