"""alexnet_jax/cpu/allocator.py: with keep_freed_memory, freed memory is reused, so repeated
large allocations stop faulting."""

from __future__ import annotations

import os
import sys

import pytest

from alexnet_jax.cpu import allocator as host

import conftest


# Allocates and frees a 64 MiB buffer (above glibc's largest mmap threshold, 32 MiB) and writes
# every page, as XLA:CPU does with a step's temporaries; prints the page faults of the last
# three rounds, counted by the kernel.
_PROBE = """
import ctypes, resource, sys
from alexnet_jax.cpu import allocator as host
applied = host.keep_freed_memory() if sys.argv[1] == 'kept' else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def round_():
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  round_()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str, env: dict[str, str] | None = None) -> tuple[str, int]:
  out = conftest.run([sys.executable, '-c', _PROBE, setting], cwd=None, check=True,
                     env=dict(os.environ, **(env or {}))).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_kept_memory_is_reused_without_page_faults():
  applied, default_faults = _faults('default')
  assert applied == 'False'
  # 3 rounds x 64 MiB of 4 KiB pages = 49,152 faults when each round gets fresh pages (fewer
  # with transparent huge pages, but far above the few a reused heap takes).
  assert default_faults > 1000
  applied, kept_faults = _faults('kept')
  if applied != 'True':
    pytest.skip('not glibc')
  assert kept_faults < 100, kept_faults


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_malloc_env_gives_another_process_the_same_reuse():
  # What the benchmark gives the PyTorch peer for the like-for-like comparison.
  applied, faults = _faults('default', env=host.malloc_env())
  assert applied == 'False'
  assert faults < 100, faults


def test_not_applied_when_jax_computes_elsewhere(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not host.jax_computes_on_cpu()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host.jax_computes_on_cpu()
