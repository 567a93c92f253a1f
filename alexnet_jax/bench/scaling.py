"""Scaling experiments: the training step of each strategy on each device count, measured,
counted and projected, on one host or across hosts.

  python -m alexnet_jax.bench.scaling --strategies=data,columns,hybrid --per_device_batch=32 \
      --output=runs/scaling
  python -m alexnet_jax.bench.scaling --cpu_devices=8 ...   # simulated devices on a CPU
  # Several hosts: the same command on every host (process 0 writes the files), with
  # --coordinator_address/--num_processes/--process_id where JAX does not detect the cluster.

For each strategy and device count (weak scaling: --per_device_batch images per device, so the
global batch grows with the devices) it compiles the step `core.parallel` trains with, and
records (`benchmark.measure_train`): images/sec, step time, compile time, peak memory per device
and the bytes each device sends per step, counted from the compiled step's collectives, and the
part of them that crosses between hosts. Against the one-device step of the same per-device
batch it gives the speedup and the scaling efficiency (speedup / devices). A count of at most
one host's devices runs on process 0's devices (the others wait); a larger one takes whole
hosts, in process order, as a training run would.

It also projects each point onto paper: the one-device step time (the compute of one device's
share, which every strategy keeps about equal, see docs/scaling.md) plus the
counted bytes, those within a host at --intra_host_gb_s and those between hosts at
--inter_host_gb_s per device, and --latency_us per collective, without overlap (the pessimistic
bound); --step_ms gives that one-device time instead, to plan for an accelerator that is not at
hand. --project_devices adds meshes that are compiled and counted only, never run, on process
0's devices: N (one host of N devices) or HxD (H hosts of D devices, e.g. 4x8, the model axes
kept within each host of D); on a CPU, --cpu_devices must cover them.

Writes OUTPUT/scaling.jsonl (one record per point), scaling.csv, scaling.png (what was measured
on this machine, beside what is projected from which step time) and prints a table.
Combinations a strategy cannot run (columns on one device) are listed as skipped, with why.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax import paths
from alexnet_jax.errors import ConfigError
from alexnet_jax.errors import UserError

FLAGS = flags.FLAGS
COLUMNS = ('parallelism', 'devices', 'hosts', 'mesh', 'batch_size', 'train_images_per_sec',
           'step_ms', 'compile_s', 'speedup', 'scaling_efficiency', 'peak_memory_mb', 'sent_mb',
           'sent_activations_mb', 'sent_between_hosts_mb', 'projected_step_ms',
           'projected_images_per_sec', 'projected_speedup', 'measured')
# Published interconnect figures, per device and each way, for the projection's defaults.
# NVIDIA H100 SXM datasheet: NVLink 4, 900 GB/s per GPU in both directions.
NVLINK4_GB_S = 450.0
# NVIDIA DGX H100: one 400 Gb/s ConnectX-7 (InfiniBand NDR) port per GPU for the compute fabric.
NDR_PER_GPU_GB_S = 50.0


def _define_flags() -> None:
  from alexnet_jax import distributed  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', cli.checkout_config('alexnet.py'),
                                  'Config whose network is measured (configs/alexnet.py).')
  flags.DEFINE_list('strategies', ['data', 'columns', 'hybrid'], 'Strategies to compare.')
  flags.DEFINE_list('devices', [], 'Device counts to run (default: 1, 2, 4, ... up to one '
                    'host\'s devices, then 2, 4, ... hosts and all of them). A count above one '
                    'host\'s devices must be whole hosts.')
  flags.DEFINE_list('project_devices', [], 'Meshes to compile and count only (not run), on '
                    'process 0\'s devices: N (one host) or HxD (H hosts of D devices).')
  flags.DEFINE_integer('per_device_batch', 32, 'Images per device (weak scaling).')
  flags.DEFINE_integer('steps', 5, 'Timed repetitions (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed repetitions after compilation.')
  flags.DEFINE_float('intra_host_gb_s', NVLINK4_GB_S, 'Bandwidth per device within a host, GB/s '
                     'each way, for the projection (450: NVLink 4, half of the 900 GB/s per H100 '
                     'of NVIDIA\'s datasheet; 25: PCIe 4 x16; about 270 for TPU v4\'s ICI, Cloud '
                     'TPU\'s 1.1 PB/s all-reduce bandwidth over a 4,096-chip pod).')
  flags.DEFINE_float('inter_host_gb_s', NDR_PER_GPU_GB_S, 'Bandwidth per device between hosts, '
                     'GB/s each way, for the projection (50: one 400 Gb/s InfiniBand NDR port '
                     'per GPU, as in NVIDIA\'s DGX H100; 25-100 on common clusters; on a TPU '
                     'slice the ICI spans the hosts: give --intra_host_gb_s\'s value).')
  flags.DEFINE_float('latency_us', 10.0, 'Latency per collective for the projection.')
  flags.DEFINE_float('step_ms', None, 'One device\'s step time for the projection, instead of '
                     'the measured one: to plan for an accelerator that is not at hand (e.g. '
                     '81, a 2015 Titan X at batch 128, docs/paper.md).')
  flags.DEFINE_integer('cpu_devices', 0, 'Simulate this many CPU devices (before JAX starts).')
  flags.DEFINE_string('output', 'scaling', 'Folder for scaling.jsonl, .csv and .png.')
  distributed.define_flags()


def _point(config: Any, strategy: str, devices: list, per_device: int, measure: bool,
           steps_: int, warmup: int, kernels: Any, per_host: int | None) -> dict[str, Any]:
  from alexnet_jax.bench import benchmark  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.parallelism = strategy
  c.batch_size = c.eval_batch_size = per_device * len(devices)
  record = benchmark.measure_train(c, devices, steps_ if measure else 0,
                                   warmup if measure else 0, kernels, per_host=per_host)
  record['measured'] = measure
  return record


def project(records: list[dict[str, Any]], intra_host_gb_s: float, inter_host_gb_s: float,
            latency_us: float, step_ms: float | None = None) -> None:
  """Adds speedup and efficiency (measured) and the projection (every record) against the
  one-device data-parallel record, in place; `step_ms` replaces its measured step time in the
  projection."""
  from alexnet_jax.bench import collectives  # pylint: disable=g-import-not-at-top
  base = next(r for r in records if r['parallelism'] == 'data' and r['devices'] == 1)
  t1 = (step_ms or base['step_ms']) / 1e3
  ips1 = base['batch_size'] / t1
  for r in records:
    if r['measured']:
      r['speedup'] = r['train_images_per_sec'] / base['train_images_per_sec']
      r['scaling_efficiency'] = r['speedup'] / r['devices']
    comm = (collectives.communication_s(r['bytes_sent'], r.get('bytes_sent_between_hosts', 0.0),
                                        r['num_collectives'], intra_host_gb_s, inter_host_gb_s,
                                        latency_us) if r['devices'] > 1 else 0.0)
    t = t1 + comm
    r['projected_step_ms'] = t * 1e3
    r['projected_images_per_sec'] = r['batch_size'] / t
    r['projected_speedup'] = r['projected_images_per_sec'] / ips1
    r['projection'] = {'intra_host_gb_s': intra_host_gb_s, 'inter_host_gb_s': inter_host_gb_s,
                       'latency_us': latency_us, 'one_device_step_ms': t1 * 1e3,
                       'step_ms_given': step_ms is not None,
                       'measured_on': base.get('device_kind', '')}


def _row(r: dict[str, Any]) -> dict[str, Any]:
  mb = lambda x: None if x is None else round(x / 2**20, 3)
  row = {k: r.get(k) for k in COLUMNS}
  row.update(mesh='x'.join(map(str, r['mesh'])), peak_memory_mb=mb(r['peak_memory_bytes']),
             sent_mb=mb(r['bytes_sent']), sent_activations_mb=mb(r['bytes_sent_activations']),
             sent_between_hosts_mb=mb(r.get('bytes_sent_between_hosts', 0.0)),
             hosts=r.get('hosts', 1))
  if not r['measured']:
    row.update(train_images_per_sec=None, step_ms=None)
  return row


def write(records: list[dict[str, Any]], skipped: list[dict[str, Any]], output: str) -> None:
  """scaling.jsonl, scaling.csv and scaling.png in `output`."""
  out = paths.resolve(output)
  out.mkdir(parents=True, exist_ok=True)
  paths.write_atomic(out / 'scaling.jsonl',
                     ''.join(json.dumps(r) + '\n' for r in records + skipped))
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=COLUMNS)
  writer.writeheader()
  for r in records:
    writer.writerow(_row(r))
  paths.write_atomic(out / 'scaling.csv', text.getvalue())
  paths.write_atomic(out / 'scaling.png', plot(records))


def plot(records: list[dict[str, Any]]) -> bytes:
  """PNG bytes, two panels that never share an axis: what was measured on this machine
  (images/sec against devices, one line per strategy) and what is projected from a one-device
  step time (speedup against devices, with the hosts of each point)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.4))
  proj = records[0]['projection']
  for i, strategy in enumerate(dict.fromkeys(r['parallelism'] for r in records)):
    mine = sorted((r for r in records if r['parallelism'] == strategy),
                  key=lambda r: (r['devices'], r.get('hosts', 1)))
    measured = [r for r in mine if r['measured']]
    if measured:
      ax1.plot([r['devices'] for r in measured], [r['train_images_per_sec'] for r in measured],
               'o-', color=f'C{i}', label=strategy)
    within = [r for r in mine if r.get('hosts', 1) == 1]
    across = [r for r in mine if r.get('hosts', 1) > 1]
    if within:
      ax2.plot([r['devices'] for r in within], [r['projected_speedup'] for r in within], 'o-',
               color=f'C{i}', label=f'{strategy}, one host')
    if across:  # drawn on from the largest one-host point
      line = within[-1:] + across
      ax2.plot([r['devices'] for r in line], [r['projected_speedup'] for r in line], 's--',
               color=f'C{i}', alpha=0.7, label=f'{strategy}, hosts of '
               f'{across[0]["devices"] // across[0]["hosts"]} (' + ', '.join(
                   str(r['hosts']) for r in across) + ' hosts)')
  n = sorted({r['devices'] for r in records})
  ax2.plot(n, n, ':', color='grey', label='ideal')
  machine = proj['measured_on'] or 'this machine'
  ax1.set(xscale='log', xlabel='devices', ylabel='training images / sec',
          title=f'Measured on {machine} (weak scaling)')
  ax1.set_ylim(bottom=0)
  source = 'given (--step_ms)' if proj['step_ms_given'] else f'measured on {machine}'
  ax2.set(xscale='log', yscale='log', xlabel='devices', ylabel='speedup over one device',
          title=f'Projected from a {proj["one_device_step_ms"]:.3g} ms one-device step '
                f'({source}),\n{proj["intra_host_gb_s"]:g} GB/s within a host, '
                f'{proj["inter_host_gb_s"]:g} GB/s between hosts, no overlap')
  ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
  ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  for ax in (ax1, ax2):
    ax.title.set_fontsize(9)
    ax.set_xticks(n, [str(x) for x in n], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  return buffer.getvalue()


def table(records: list[dict[str, Any]]) -> str:
  """The printed table: one line per point."""
  head = (f'{"strategy":8s} {"dev":>4s} {"hosts":>5s} {"mesh":>5s} {"batch":>6s} {"img/s":>8s} '
          f'{"eff":>5s} {"compile":>7s} {"peak MB":>8s} {"sent MB":>8s} {"act MB":>7s} '
          f'{"hosts MB":>8s} {"proj img/s":>10s}')
  lines = [head]
  fmt = lambda x, f: format('-', '>' + f.split('.')[0]) if x is None else format(x, f)
  for r in records:
    row = _row(r)
    lines.append(
        f'{row["parallelism"]:8s} {row["devices"]:4d} {row["hosts"]:5d} {row["mesh"]:>5s} '
        f'{row["batch_size"]:6d} {fmt(row["train_images_per_sec"], "8.1f")} '
        f'{fmt(row["scaling_efficiency"], "5.2f")} {row["compile_s"]:7.1f} '
        f'{fmt(row["peak_memory_mb"], "8.1f")} {row["sent_mb"]:8.2f} '
        f'{row["sent_activations_mb"]:7.2f} {row["sent_between_hosts_mb"]:8.2f} '
        f'{row["projected_images_per_sec"]:10.1f}')
  return '\n'.join(lines)


def _ints(name: str, values: list[str]) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise UserError(f'--{name}={",".join(values)}: give whole numbers, e.g. 1,2,4,8') from None
  if any(v < 1 for v in out):
    raise UserError(f'--{name}: device counts must be >= 1')
  return out


def _meshes(values: list[str]) -> list[tuple[int, int]]:
  """--project_devices: N or HxD -> (hosts, devices per host)."""
  out = []
  for v in values:
    parts = v.lower().split('x')
    try:
      hosts, per_host = (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
      raise UserError(f'--project_devices={v}: give N (devices of one host) or HxD (H hosts of '
                      'D devices), e.g. 8,4x8') from None
    if len(parts) > 2 or hosts < 1 or per_host < 1:
      raise UserError(f'--project_devices={v}: give N or HxD with H, D >= 1')
    out.append((hosts, per_host))
  return out


def _run_counts(given: list[int], per_host: int, hosts: int) -> list[int]:
  """The device counts to run: `given`, checked against the hosts, or the default sweep."""
  if not given:
    given = [2 ** k for k in range(per_host.bit_length())] + [per_host]
    given += [per_host * 2 ** k for k in range(1, hosts.bit_length())] + [per_host * hosts]
  for n in given:
    if n > per_host * hosts:
      raise UserError(f'--devices={n}: {per_host * hosts} devices here ({hosts} '
                      f'host{"s" * (hosts > 1)} of {per_host})'
                      + (' (add --cpu_devices=N)' if hosts == 1 else ''))
    if n > per_host and n % per_host:
      raise UserError(f'--devices={n}: a count above one host\'s {per_host} devices must be '
                      'whole hosts (a multiple of it)')
  return list(dict.fromkeys(given))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.cpu_devices:
    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)
  from alexnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import distributed  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import parallel  # pylint: disable=g-import-not-at-top
  distributed.initialize_from_flags()
  config = FLAGS.config
  if config is None:
    raise UserError('No configs/alexnet.py next to this installation: pass --config=FILE.')
  unknown = set(FLAGS.strategies) - set(config_lib.STRATEGIES)
  if unknown:
    raise UserError(f'--strategies: unknown {sorted(unknown)}; choose from '
                    f'{config_lib.STRATEGIES}')
  if FLAGS.per_device_batch < 1 or FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise UserError('--per_device_batch and --steps must be >= 1, --warmup >= 0')
  if (min(FLAGS.intra_host_gb_s, FLAGS.inter_host_gb_s) <= 0 or FLAGS.latency_us < 0
      or (FLAGS.step_ms or 1) <= 0):
    raise UserError('--intra_host_gb_s, --inter_host_gb_s and --step_ms must be > 0 and '
                    '--latency_us >= 0')
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  per_host, hosts = parallel.devices_per_host(devices), jax.process_count()
  run_counts = _run_counts(_ints('devices', FLAGS.devices), per_host, hosts)
  paper_meshes = _meshes(FLAGS.project_devices)
  for h, d in paper_meshes:
    if h * d > per_host:
      raise UserError(f'--project_devices={h}x{d}: {h * d} devices asked for, {per_host} on '
                      'process 0' + (' (add --cpu_devices=N)' if jax.default_backend() == 'cpu'
                                     else ''))
  is_main = jax.process_index() == 0
  config.dataset = 'synthetic'  # Data made on the devices: no dataset is read.
  if is_main:
    cli.prepare_output(FLAGS.output, folder=True)
  config.batch_size = config.eval_batch_size = FLAGS.per_device_batch
  config_lib.validate(config, num_devices=1)
  kernels = kernels_lib.resolve(config)
  say = lambda text: print(text, flush=True) if is_main else None
  say(f'{devices[0].device_kind} ({jax.default_backend()}), {hosts} host(s) x {per_host} '
      f'devices, {os.cpu_count()} CPUs per host; model={config.model} dtype={config.dtype} '
      f'per-device batch={FLAGS.per_device_batch}; kernels: {kernels.describe()}')
  # (strategy, devices, hosts) -> measured? The one-device data point is every point's reference.
  plan = {('data', 1, 1): True}
  for strategy in FLAGS.strategies:
    for h, d in paper_meshes:
      plan.setdefault((strategy, h * d, h), False)
    for n in run_counts:
      plan[(strategy, n, max(1, n // per_host))] = True
  records, skipped = [], []
  for (strategy, n, h), measure in plan.items():
    if measure:  # Whole hosts in process order, or process 0's first n devices.
      point = devices[:n]
      virtual = None
      if h > 1:  # Every process meets here first: one may have run points alone.
        distributed.barrier(f'alexnet_jax scaling: {strategy} {n}')
      if jax.process_index() not in {d.process_index for d in point}:
        continue
    else:  # Counted only, on process 0's devices taken as h hosts of n / h.
      if not is_main:
        continue
      point, virtual = [d for d in devices if d.process_index == 0][:n], n // h
    try:
      record = _point(config, strategy, point, FLAGS.per_device_batch, measure, FLAGS.steps,
                      FLAGS.warmup, kernels, virtual)
    except ConfigError as e:
      skipped.append({'parallelism': strategy, 'devices': n, 'hosts': h, 'skipped': str(e)})
      say(f'skipped {strategy} on {n} devices ({h} host{"s" * (h > 1)}): {e}')
      continue
    record['device_kind'] = devices[0].device_kind
    records.append(record)
    speed = (f'{record["train_images_per_sec"]:.1f} img/s' if measure
             else 'compiled and counted only')
    say(f'{strategy} on {n} devices ({h} host{"s" * (h > 1)}): {speed}, '
        f'{record["bytes_sent"] / 2**20:.2f} MB sent per device per step '
        f'({record["bytes_sent_between_hosts"] / 2**20:.2f} MB between hosts), compiled in '
        f'{record["compile_s"]:.1f} s')
  if not is_main:
    return
  order = {s: i for i, s in enumerate(['data'] + FLAGS.strategies)}
  records.sort(key=lambda r: (order[r['parallelism']], r['devices'], r['hosts']))
  project(records, FLAGS.intra_host_gb_s, FLAGS.inter_host_gb_s, FLAGS.latency_us,
          FLAGS.step_ms)
  write(records, skipped, FLAGS.output)
  print(table(records))
  print(f'Wrote {FLAGS.output}/scaling.jsonl, scaling.csv and scaling.png')


if __name__ == '__main__':
  cli.run(main, _define_flags)
