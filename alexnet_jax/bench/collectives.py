"""The collectives of a compiled step, read from its optimised HLO, and the bytes they move.

`collectives(hlo_text, num_devices)` lists every all-gather, all-reduce, reduce-scatter,
all-to-all and collective-permute that XLA kept after optimisation (combined ones count once,
with all their operands), with the size of its device groups, its bytes and the JAX operation
it came from (`op_name`, e.g. 'jit(step)/shard_map/jvp(AlexNet)/conv3/all_gather').

`bytes_sent` is what one device transmits for it, with the bandwidth-optimal ring algorithms
that NCCL and TPU interconnects use for large messages: for n devices in a group and a full
(gathered / reduced) array of S bytes, an all-gather or a reduce-scatter sends S (n-1)/n, an
all-reduce twice that, an all-to-all S (n-1)/n, a collective-permute S. Latency per message is
not in the bytes; `project` adds it per collective.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

_KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16}
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+'
                 r'(?P<kind>' + '|'.join(_KINDS) + r')(?:-start)?\(')
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # one of _KINDS
  result_bytes: int  # bytes of the result on one device (all operands of a combined op)
  group_size: int  # devices that take part together
  op_name: str  # the JAX operation it came from ('' when XLA kept none)

  @property
  def full_bytes(self) -> int:
    """Bytes of the whole (gathered or reduced) array: a reduce-scatter's input."""
    return self.result_bytes * (self.group_size if self.kind == 'reduce-scatter' else 1)

  @property
  def bytes_sent(self) -> float:
    """Bytes one device transmits (ring algorithms, see the module docstring)."""
    n = self.group_size
    if n <= 1:
      return 0.0
    if self.kind == 'collective-permute':
      return float(self.result_bytes)
    share = self.full_bytes * (n - 1) / n
    return 2 * share if self.kind == 'all-reduce' else share

  @property
  def layer(self) -> str:
    """The network layer it belongs to ('conv3', 'fc6', ...), or '' (gradients, metrics)."""
    match = re.search(r'AlexNet\)*/(\w+)/', self.op_name)
    return match.group(1) if match else ''

  @property
  def backward(self) -> bool:
    return 'transpose(' in self.op_name


def _group_size(line: str, num_devices: int) -> int:
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line)
  if iota:
    return int(iota.group(2))
  groups = re.search(r'replica_groups=\{(.*?)\}(?:,|\s|$)', line)
  if groups and groups.group(1).strip():
    first = re.search(r'\{([\d,\s]*)\}', groups.group(1) + '}')
    if first:
      return len([x for x in first.group(1).split(',') if x.strip()])
  pairs = re.search(r'source_target_pairs=\{(.*?)\}\s*(?:,|$)', line)
  if pairs:
    return 2
  return num_devices  # replica_groups={} or none: every device.


def _bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = 1
    for d in filter(None, dims.split(',')):
      size *= int(d)
    total += size * _DTYPE_BYTES[dtype]
  return total


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
  """Every collective in `hlo_text` (a compiled executable's `as_text()`)."""
  found = []
  for line in hlo_text.splitlines():
    match = _OP.match(line)
    if not match or '-done(' in line:
      continue
    shape, kind = match.group('shape'), match.group('kind')
    if match.group(0).rstrip('(').endswith('-start') and kind != 'all-reduce':
      # GPU's async starts return (operands, results) for an all-gather, (operand, result,
      # contexts) for a permute; an all-reduce-start returns its results alone. (Other async
      # collectives are wrapped computations, whose bodies hold the plain op counted here.)
      parts = _ARRAY.findall(shape)
      keep = parts[len(parts) // 2:] if kind == 'all-gather' else parts[1:2]
      shape = ' '.join(f'{d}[{s}]' for d, s in keep)
    op_name = re.search(r'op_name="([^"]*)"', line)
    found.append(Collective(kind, _bytes(shape),
                            _group_size(line, num_devices), op_name.group(1) if op_name else ''))
  return found


def bytes_sent(found: Iterable[Collective]) -> float:
  """Bytes one device sends per step for all of `found`."""
  return float(sum(c.bytes_sent for c in found))


def project(step_s: float, found: Iterable[Collective], bandwidth_gb_s: float,
            latency_us: float = 0.0, overlap: bool = False) -> float:
  """A step time on paper: the measured compute time of one device's share plus the time to
  send `found`'s bytes at `bandwidth_gb_s` (GB/s per device, each way) with `latency_us` per
  collective; `overlap` assumes communication hides entirely behind compute (the best case)
  instead of adding to it (the worst)."""
  found = list(found)
  comm = bytes_sent(found) / (bandwidth_gb_s * 1e9) + len(found) * latency_us * 1e-6
  return max(step_s, comm) if overlap else step_s + comm
