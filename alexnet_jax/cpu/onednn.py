"""Convolutions through oneDNN on XLA:CPU: XLA FFI custom calls, with a hand-written VJP.

XLA:CPU's own kernels run the float32 gradients of the paper's stride-1 convolutions at
65-140 GFLOP/s on our 2-core AVX-512 machine (conv2's input and kernel gradients at 70-90);
oneDNN, the library PyTorch uses on CPUs, runs forward, input gradient and kernel gradient of
the same layers at 190-245 GFLOP/s there (BENCHMARKS.md). This module makes oneDNN's convolutions
available to JAX on the CPU backend:

* `csrc/onednn_conv.cc` holds three XLA FFI handlers (forward, input gradient, kernel gradient)
  on JAX's own layouts (NHWC activations, HWIO kernels; float32, or bfloat16 where the CPU
  multiplies it natively);
* `available()` compiles it once with the system's C++ compiler against the `onednn-cpu-gomp`
  and `onednn-devel-cpu-gomp` wheels (requirements.txt) and JAX's FFI headers, caches the shared
  library (`$ALEXNET_JAX_CACHE`, default ~/.cache/alexnet_jax) and registers the handlers; where
  anything is missing it says why, once, and the callers keep XLA's convolutions;
* `conv2d` is the convolution with a `jax.custom_vjp` whose backward pass is the two gradient
  calls. Tests compare values and gradients with `lax.conv_general_dilated` + `jax.grad`.

Only the CPU backend can run these calls; `ops.conv` uses them on the CPU only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'onednn_conv.cc')
_TARGETS = {  # FFI target name -> symbol in the shared library.
    'alexnet_onednn_conv_fwd': 'AlexnetOnednnConvFwd',
    'alexnet_onednn_conv_bwd_data': 'AlexnetOnednnConvBwdData',
    'alexnet_onednn_conv_bwd_weights': 'AlexnetOnednnConvBwdWeights',
}

Padding = tuple[tuple[int, int], tuple[int, int]]

_unavailable_reason: str | None = None


def _dnnl_prefix() -> str | None:
  """The install prefix holding oneDNN's headers and library (where pip puts wheel data)."""
  import site  # pylint: disable=g-import-not-at-top
  prefixes = [sys.prefix, sys.base_prefix, site.getuserbase()]
  for prefix in dict.fromkeys(prefixes):
    if (os.path.exists(os.path.join(prefix, 'include', 'oneapi', 'dnnl', 'dnnl.hpp')) and
        os.path.exists(os.path.join(prefix, 'lib', 'libdnnl.so'))):
      return prefix
  return None


def cache_dir() -> str:
  from alexnet_jax import paths  # pylint: disable=g-import-not-at-top
  return paths.cache_dir()


def _cache_key(cxx: str, cmd_flags: list[str], lib_dir: str) -> str:
  """What the built library depends on: the source, the flags, JAX, oneDNN, the compiler (its
  path and version) and the platform (machine, OS, Python ABI)."""
  try:
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, check=False,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f'the C++ compiler {cxx} does not run: {e}') from e
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  inputs = (cmd_flags, lib_dir, jax.__version__,
            os.path.realpath(os.path.join(lib_dir, 'libdnnl.so')), os.path.realpath(cxx),
            version, platform.machine(), platform.system(), platform.libc_ver(),
            sys.implementation.cache_tag)
  return hashlib.sha256(source + repr(inputs).encode()).hexdigest()[:16]


def _build(rebuild: bool = False) -> str:
  """Compiles csrc/onednn_conv.cc (once per `_cache_key`) and returns the .so path; `rebuild`
  compiles again over a cached library (one that failed to load)."""
  prefix = _dnnl_prefix()
  if prefix is None:
    raise RuntimeError('oneDNN is not installed (pip install onednn-cpu-gomp '
                       'onednn-devel-cpu-gomp, as in requirements.txt)')
  cxx = shutil.which(os.environ.get('CXX', 'g++'))
  if cxx is None:
    raise RuntimeError('no C++ compiler (g++, or $CXX) to build the oneDNN calls')
  lib_dir = os.path.join(prefix, 'lib')
  cmd_flags = ['-O2', '-std=c++17', '-shared', '-fPIC', '-isystem', jax.ffi.include_dir(),
               '-isystem', os.path.join(prefix, 'include')]
  path = os.path.join(cache_dir(), f'onednn_conv-{_cache_key(cxx, cmd_flags, lib_dir)}.so')
  if os.path.exists(path) and not rebuild:
    return path
  os.makedirs(cache_dir(), exist_ok=True)
  logging.info('Building the oneDNN convolution calls (once): %s', path)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache_dir())
  os.close(fd)
  cmd = [cxx, *cmd_flags, _SOURCE, '-o', tmp, f'-L{lib_dir}', '-ldnnl', f'-Wl,-rpath,{lib_dir}']
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
      raise RuntimeError(f'building the oneDNN calls failed ({" ".join(cmd)}):\n'
                         f'{proc.stderr[-3000:]}')
    os.replace(tmp, path)  # Atomic: processes building at once each see a whole file.
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the oneDNN convolutions are built and registered (builds them the first time).

  False, with the reason logged once (and kept in `unavailable_reason()`), where oneDNN, a C++
  compiler or a CPU JAX backend is missing; callers then keep XLA's convolutions.
  """
  global _unavailable_reason
  try:
    if 'cpu' not in {d.platform for d in jax.devices('cpu')}:
      raise RuntimeError('no CPU backend')
    for target, symbol in _built_symbols().items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform='cpu')
    return True
  except (RuntimeError, OSError, AttributeError, ValueError, TypeError,
          subprocess.SubprocessError) as e:
    _unavailable_reason = f'{type(e).__name__}: {e}'
    logging.warning('oneDNN convolutions unavailable, using XLA\'s: %s', _unavailable_reason)
    return False


def _built_symbols() -> dict[str, object]:
  """The FFI handlers of the built library: built once, and built again once if the cached
  library does not load (damaged, or left by an interrupted copy); a second failure raises."""
  try:
    return _load(_build())
  except (OSError, AttributeError) as e:
    logging.warning('The cached oneDNN calls did not load (%s): building them again.', e)
    return _load(_build(rebuild=True))


def _load(path: str) -> dict[str, object]:
  """The FFI handlers (target -> function) of the shared library at `path`."""
  lib = ctypes.cdll.LoadLibrary(path)
  return {target: getattr(lib, symbol) for target, symbol in _TARGETS.items()}


def unavailable_reason() -> str | None:
  return _unavailable_reason


# The values of oneDNN's cap on the instructions it may use (ONEDNN_MAX_CPU_ISA, or its older
# name DNNL_MAX_CPU_ISA) that leave out AVX512-BF16 and AMX.
_CAPS_WITHOUT_BF16 = ('sse41', 'avx', 'avx2', 'avx2_vnni', 'avx2_vnni_2', 'avx512_core',
                      'avx512_core_vnni')


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
  """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read from
  /proc/cpuinfo, and oneDNN may use those instructions (no cap below them); without them
  oneDNN's bfloat16 convolutions are no faster than float32, or, capped at AVX2, not there."""
  cap = os.environ.get('ONEDNN_MAX_CPU_ISA') or os.environ.get('DNNL_MAX_CPU_ISA') or ''
  if cap.lower() in _CAPS_WITHOUT_BF16:
    return False
  try:
    with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
      flags = next((line for line in f if line.startswith('flags')), '').split()
  except OSError:
    return False
  return 'avx512_bf16' in flags or 'amx_bf16' in flags


def _attrs(stride: int, padding: Padding) -> dict[str, np.int64]:
  (pt, pb), (pl, pr) = padding
  return {'stride': np.int64(stride), 'pad_top': np.int64(pt), 'pad_left': np.int64(pl),
          'pad_bottom': np.int64(pb), 'pad_right': np.int64(pr)}


def output_shape(x_shape: Sequence[int], kernel_shape: Sequence[int], stride: int,
                 padding: Padding) -> tuple[int, int, int, int]:
  (pt, pb), (pl, pr) = padding
  kh, kw, _, cout = kernel_shape
  return (x_shape[0], (x_shape[1] + pt + pb - kh) // stride + 1,
          (x_shape[2] + pl + pr - kw) // stride + 1, cout)


def _call(target: str, shape: Sequence[int], a: jax.Array, b: jax.Array, stride: int,
          padding: Padding) -> jax.Array:
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(shape), a.dtype),
                          vmap_method='sequential')(a, b, **_attrs(stride, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  """Cross-correlation of NHWC `x` with an HWIO `kernel` by oneDNN (CPU backend only).

  Both float32 or both bfloat16; `padding` is ((top, bottom), (left, right)). Call
  `available()` first.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f'onednn.conv2d takes NHWC activations and an HWIO kernel, got shapes '
                     f'{x.shape} and {kernel.shape}')
  if x.dtype != kernel.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
    raise TypeError(f'onednn.conv2d takes float32 or bfloat16 operands of one type, got '
                    f'{x.dtype} and {kernel.dtype}')
  return _call('alexnet_onednn_conv_fwd', output_shape(x.shape, kernel.shape, stride, padding),
               x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return conv2d(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  dx = _call('alexnet_onednn_conv_bwd_data', x.shape, dy, kernel, stride, padding)
  dkernel = _call('alexnet_onednn_conv_bwd_weights', kernel.shape, x, dy, stride, padding)
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
