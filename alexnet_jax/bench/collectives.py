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

Across hosts the links are two: fast ones within a host (NVLink, a TPU host's ICI) and a slower
network between hosts. `Collective.bytes_between_hosts(host_of)` splits a device's bytes with the
hierarchical algorithms NCCL and XLA use on such machines: for a group of h hosts with l devices
each, an all-reduce is a reduce-scatter within the host, an all-reduce of the 1/l shards between
hosts and an all-gather within the host, so 2 S (l-1)/l stay within the host and 2 S (h-1)/(h l)
cross; an all-gather or a reduce-scatter sends S (l-1)/l within and S (h-1)/(h l) across; an
all-to-all sends the share S (h-1)/h addressed to other hosts across; a collective-permute's pair
that joins two hosts sends across. The totals stay the ring's.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

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
  # The device groups, as logical device ids (a position in the compiled program's device
  # assignment); for a collective-permute, its (source, target) pairs; None: every device.
  groups: tuple[tuple[int, ...], ...] | None = None

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

  def bytes_between_hosts(self, host_of: Sequence[int]) -> float:
    """Of `bytes_sent`, what crosses between hosts when logical device i is on host
    `host_of[i]` (the hierarchical algorithms of the module docstring); the group that sends
    the most sets it."""
    groups = self.groups or (tuple(range(len(host_of))),)
    if self.kind == 'collective-permute':
      crossing = sum(host_of[a] != host_of[b] for a, b in groups)
      return self.result_bytes * crossing / max(len(groups), 1)
    worst = 0.0
    for group in groups:
      per_host = collections.Counter(host_of[i] for i in group)
      h, l = len(per_host), max(per_host.values())
      if h == 1:
        continue
      s = self.full_bytes
      if self.kind == 'all-to-all':
        across = s * (h - 1) / h
      else:
        across = s * (h - 1) / (h * l) * (2 if self.kind == 'all-reduce' else 1)
      worst = max(worst, across)
    return worst

  @property
  def layer(self) -> str:
    """The network layer it belongs to ('conv3', 'fc6', ...), or '' (gradients, metrics)."""
    match = re.search(r'AlexNet\)*/(\w+)/', self.op_name)
    return match.group(1) if match else ''

  @property
  def backward(self) -> bool:
    return 'transpose(' in self.op_name


def _iota_groups(spec: str) -> tuple[tuple[int, ...], ...]:
  """XLA's compact replica groups, '[G,S]<=[d0,d1,...]T(p0,p1,...)': the ids 0..N-1 laid out as
  the dims, transposed by the permutation (if any), read as G groups of S."""
  match = re.match(r'\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', spec)
  g, size = int(match.group(1)), int(match.group(2))
  dims = [int(d) for d in match.group(3).split(',')]
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  if match.group(4):
    ids = ids.transpose([int(p) for p in match.group(4).split(',')])
  return tuple(tuple(int(i) for i in row) for row in ids.reshape(g, size))


def _groups(line: str) -> tuple[tuple[int, ...], ...] | None:
  """The device groups (or a permute's pairs) of a collective's HLO line; None: every device."""
  iota = re.search(r'replica_groups=(\[\d+,\d+\]<=\[[\d,]+\](?:T\([\d,]+\))?)', line)
  if iota:
    return _iota_groups(iota.group(1))
  listed = re.search(r'(?:replica_groups|source_target_pairs)=\{((?:\{[\d,\s]*\},?\s*)*)\}',
                     line)
  if listed and listed.group(1).strip():
    return tuple(tuple(int(x) for x in g.split(',') if x.strip())
                 for g in re.findall(r'\{([\d,\s]*)\}', listed.group(1)))
  return None


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
    groups = _groups(line)
    size = (2 if kind == 'collective-permute' else len(groups[0])) if groups else num_devices
    found.append(Collective(kind, _bytes(shape), size, op_name.group(1) if op_name else '',
                            groups))
  return found


def bytes_sent(found: Iterable[Collective]) -> float:
  """Bytes one device sends per step for all of `found`."""
  return float(sum(c.bytes_sent for c in found))


def bytes_between_hosts(found: Iterable[Collective], host_of: Sequence[int]) -> float:
  """Of `bytes_sent(found)`, what one device sends to other hosts per step."""
  return float(sum(c.bytes_between_hosts(host_of) for c in found))


def communication_s(sent: float, between_hosts: float, messages: int, intra_host_gb_s: float,
                    inter_host_gb_s: float, latency_us: float = 0.0) -> float:
  """Seconds to send `sent` bytes per device, `between_hosts` of them over the network between
  hosts and the rest over the links within a host (GB/s per device, each way), with
  `latency_us` per collective."""
  return ((sent - between_hosts) / (intra_host_gb_s * 1e9) + between_hosts / (inter_host_gb_s * 1e9)
          + messages * latency_us * 1e-6)


def project(step_s: float, found: Iterable[Collective], intra_host_gb_s: float,
            inter_host_gb_s: float | None = None, host_of: Sequence[int] | None = None,
            latency_us: float = 0.0, overlap: bool = False) -> float:
  """A step time on paper: the compute time of one device's share plus the time to send
  `found`'s bytes (`communication_s`; one host unless `host_of` says where each logical device
  is); `overlap` assumes communication hides entirely behind compute (the best case) instead of
  adding to it (the worst)."""
  found = list(found)
  across = bytes_between_hosts(found, host_of) if host_of else 0.0
  comm = communication_s(bytes_sent(found), across, len(found), intra_host_gb_s,
                         inter_host_gb_s or intra_host_gb_s, latency_us)
  return max(step_s, comm) if overlap else step_s + comm
