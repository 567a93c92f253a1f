"""Which implementation computes each layer: chosen once per run, before tracing.

The config's kernel fields (conv_backend, conv_impl, column_impl, pool_impl, lrn_impl) may say
'auto'; `resolve` turns them into concrete choices from the platform of the devices the run
uses, so that nothing decides while a function is traced. The training loop logs the result and
writes it into the run's config.json; the benchmark prints it. An explicit choice that cannot be
honoured is a ConfigError, never a silent fallback.

What 'auto' picks, and why (measured on XLA:CPU at batch 128; BENCHMARKS.md):
- conv_backend: oneDNN on the CPU for float32 (and bfloat16 where the CPU multiplies it
  natively) when its calls build: conv2's two columns 774 vs 1,420 ms forward+backward, conv3
  430 vs 735. XLA's own everywhere else.
- conv_impl (conv1, stride 4): with oneDNN its direct convolution (229 ms); else on the CPU the
  im2col matrix product (784 vs 1,075 ms for XLA's strided convolution); GPU/TPU keep 'direct'.
- column_impl: two half-convolutions on the CPU (a grouped convolution measured 5.1x slower on
  XLA:CPU); GPU/TPU convolution libraries run the grouped form natively.
- pool_impl: the scatter-free mask gradient on the CPU (select-and-scatter took 13x the forward
  pass); XLA's own on GPU/TPU, whose pooling backward is a native kernel.
- lrn_impl: the hand-written gradient everywhere (fewer passes over memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from alexnet_jax import cpu
from alexnet_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Concrete implementation choices; the defaults are the plain reference forms."""
  conv_backend: str = 'xla'  # 'xla' | 'onednn'
  conv_impl: str = 'direct'  # conv1's strided convolution: 'direct' | 'im2col'
  column_impl: str = 'grouped'  # two-column convolutions: 'split' | 'grouped'
  pool_impl: str = 'reduce_window'  # 'reduce_window' | 'mask'
  lrn_impl: str = 'reduce_window'  # 'reduce_window' | 'custom'

  def as_dict(self) -> dict[str, str]:
    return dataclasses.asdict(self)

  def describe(self) -> str:
    return ', '.join(f'{k}={v}' for k, v in self.as_dict().items())


def _platform(devices: Sequence[Any] | None) -> str:
  if devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
  return devices[0].platform


def resolve(config: Any, devices: Sequence[Any] | None = None) -> Kernels:
  """The concrete kernels for `config` on `devices` (default: JAX's default devices).

  Raises ConfigError when an explicit choice cannot run there (oneDNN off the CPU, or not
  built; bfloat16 oneDNN without native bfloat16; grouped columns with oneDNN, whose calls are
  ungrouped).
  """
  on_cpu = _platform(devices) == 'cpu'
  backend = _conv_backend(config.conv_backend, config.dtype, on_cpu)
  has_columns = config.model in ('paper', 'small')
  column_impl = config.column_impl
  if column_impl == 'auto':
    column_impl = 'split' if on_cpu or backend == 'onednn' else 'grouped'
  elif column_impl == 'grouped' and backend == 'onednn' and has_columns:
    raise ConfigError("config.column_impl='grouped' with conv_backend='onednn': the oneDNN "
                      "calls are ungrouped; use column_impl='split' (or 'auto'), or "
                      "conv_backend='xla'")
  conv_impl = config.conv_impl
  if conv_impl == 'auto':
    conv_impl = 'direct' if backend == 'onednn' or not on_cpu else 'im2col'
  pool_impl = config.pool_impl
  if pool_impl == 'auto':
    pool_impl = 'mask' if on_cpu else 'reduce_window'
  lrn_impl = 'custom' if config.lrn_impl == 'auto' else config.lrn_impl
  return Kernels(conv_backend=backend, conv_impl=conv_impl, column_impl=column_impl,
                 pool_impl=pool_impl, lrn_impl=lrn_impl)


def _conv_backend(choice: str, dtype: str, on_cpu: bool) -> str:
  if choice == 'xla':
    return 'xla'
  bf16 = dtype == 'bfloat16'
  if choice == 'auto':
    fast = not bf16 or cpu.cpu_has_bf16()
    return 'onednn' if on_cpu and fast and cpu.onednn_available() else 'xla'
  if not on_cpu:
    raise ConfigError("config.conv_backend='onednn': oneDNN runs on the CPU backend only, and "
                      "this run's devices are not CPUs; use 'auto' or 'xla'")
  if bf16 and not cpu.cpu_has_bf16():
    raise ConfigError("config.conv_backend='onednn' with config.dtype='bfloat16' needs a CPU "
                      "with AVX512-BF16 or AMX; use float32, or conv_backend='auto'")
  if not cpu.onednn_available():
    raise ConfigError(f"config.conv_backend='onednn': {cpu.onednn_unavailable_reason()}; use "
                      "'auto' or 'xla'")
  return 'onednn'
