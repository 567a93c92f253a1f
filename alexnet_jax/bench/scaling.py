"""Scaling experiments: the training step of each strategy on each device count, measured,
counted and projected.

  python -m alexnet_jax.bench.scaling --strategies=data,columns,hybrid --devices=1,2,4,8 \
      --per_device_batch=32 --output=runs/scaling
  python -m alexnet_jax.bench.scaling --cpu_devices=8 ...   # simulated devices on a CPU

For each strategy and device count (weak scaling: --per_device_batch images per device, so the
global batch grows with the devices) it compiles the step `core.parallel` trains with, and
records (`benchmark.measure_train`): images/sec, step time, compile time, peak memory per device
and the bytes each device sends per step, counted from the compiled step's collectives. Against
the one-device step of the same per-device batch it gives the speedup and the scaling
efficiency (speedup / devices).

It also projects each point onto paper: the one-device step time (the compute of one device's
share, which every strategy keeps about equal, see README "Scaling experiments") plus the
counted bytes at --bandwidth_gb_s per device and --latency_us per collective, without overlap
(the pessimistic bound); --step_ms gives that one-device time instead, to plan for an
accelerator that is not at hand. --project_devices adds device counts that are compiled and
counted only, never run (on a CPU, --cpu_devices must cover them).

Writes OUTPUT/scaling.jsonl (one record per point), scaling.csv, scaling.png (throughput and
efficiency against devices, one line per strategy, the projections dashed) and prints a table.
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
COLUMNS = ('parallelism', 'devices', 'mesh', 'batch_size', 'train_images_per_sec', 'step_ms',
           'compile_s', 'speedup', 'scaling_efficiency', 'peak_memory_mb', 'sent_mb',
           'sent_activations_mb', 'projected_step_ms', 'projected_images_per_sec',
           'projected_speedup', 'measured')


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', cli.checkout_config('alexnet.py'),
                                  'Config whose network is measured (configs/alexnet.py).')
  flags.DEFINE_list('strategies', ['data', 'columns', 'hybrid'], 'Strategies to compare.')
  flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Device counts to run.')
  flags.DEFINE_list('project_devices', [], 'Device counts to compile and count only (not run).')
  flags.DEFINE_integer('per_device_batch', 32, 'Images per device (weak scaling).')
  flags.DEFINE_integer('steps', 5, 'Timed repetitions (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed repetitions after compilation.')
  flags.DEFINE_float('bandwidth_gb_s', 25.0, 'Interconnect bandwidth per device, GB/s each way, '
                     'for the projection (25: PCIe 4 x16; NVLink 4 is about 450, TPU v4 ICI '
                     'about 270 per chip).')
  flags.DEFINE_float('latency_us', 10.0, 'Latency per collective for the projection.')
  flags.DEFINE_float('step_ms', None, 'One device\'s step time for the projection, instead of '
                     'the measured one: to plan for an accelerator that is not at hand (e.g. '
                     '81, a 2015 Titan X at batch 128, ../shared/PAPER.md).')
  flags.DEFINE_integer('cpu_devices', 0, 'Simulate this many CPU devices (before JAX starts).')
  flags.DEFINE_string('output', 'scaling', 'Folder for scaling.jsonl, .csv and .png.')


def _point(config: Any, strategy: str, n: int, per_device: int, measure: bool,
           steps_: int, warmup: int, kernels: Any) -> dict[str, Any]:
  from alexnet_jax.bench import benchmark  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.parallelism = strategy
  c.batch_size = c.eval_batch_size = per_device * n
  record = benchmark.measure_train(c, n, steps_ if measure else 0, warmup if measure else 0,
                                   kernels)
  record['measured'] = measure
  return record


def project(records: list[dict[str, Any]], bandwidth_gb_s: float, latency_us: float,
            step_ms: float | None = None) -> None:
  """Adds speedup and efficiency (measured) and the projection (every record) against the
  one-device data-parallel record, in place; `step_ms` replaces its measured step time in the
  projection."""
  base = next(r for r in records if r['parallelism'] == 'data' and r['devices'] == 1)
  t1 = (step_ms or base['step_ms']) / 1e3
  ips1 = base['batch_size'] / t1
  for r in records:
    if r['measured']:
      r['speedup'] = r['train_images_per_sec'] / base['train_images_per_sec']
      r['scaling_efficiency'] = r['speedup'] / r['devices']
    comm = (r['bytes_sent'] / (bandwidth_gb_s * 1e9) + r['num_collectives'] * latency_us * 1e-6
            if r['devices'] > 1 else 0.0)
    t = t1 + comm
    r['projected_step_ms'] = t * 1e3
    r['projected_images_per_sec'] = r['batch_size'] / t
    r['projected_speedup'] = r['projected_images_per_sec'] / ips1
    r['projection'] = {'bandwidth_gb_s': bandwidth_gb_s, 'latency_us': latency_us,
                       'one_device_step_ms': t1 * 1e3, 'step_ms_given': step_ms is not None}


def _row(r: dict[str, Any]) -> dict[str, Any]:
  mb = lambda x: None if x is None else round(x / 2**20, 3)
  row = {k: r.get(k) for k in COLUMNS}
  row.update(mesh='x'.join(map(str, r['mesh'])), peak_memory_mb=mb(r['peak_memory_bytes']),
             sent_mb=mb(r['bytes_sent']), sent_activations_mb=mb(r['bytes_sent_activations']))
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
  """PNG bytes: images/sec and scaling efficiency against devices, one line per strategy
  (measured solid, projected dashed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  bw = records[0]['projection']['bandwidth_gb_s']
  for i, strategy in enumerate(dict.fromkeys(r['parallelism'] for r in records)):
    colour = f'C{i}'
    mine = sorted((r for r in records if r['parallelism'] == strategy),
                  key=lambda r: r['devices'])
    measured = [r for r in mine if r['measured']]
    if measured:
      ax1.plot([r['devices'] for r in measured], [r['train_images_per_sec'] for r in measured],
               'o-', color=colour, label=f'{strategy} (measured)')
      ax2.plot([r['devices'] for r in measured], [r['scaling_efficiency'] for r in measured],
               'o-', color=colour, label=f'{strategy} (measured)')
    n = [r['devices'] for r in mine]
    ax1.plot(n, [r['projected_images_per_sec'] for r in mine], 's--', color=colour, alpha=0.6,
             label=f'{strategy} (projected, {bw:g} GB/s)')
    ax2.plot(n, [r['projected_speedup'] / r['devices'] for r in mine], 's--', color=colour,
             alpha=0.6, label=f'{strategy} (projected)')
  proj = records[0]['projection']
  ax1.set(xscale='log', yscale='log', xlabel='devices', ylabel='training images / sec',
          title='Throughput (weak scaling); projected from a one-device step of '
                f'{proj["one_device_step_ms"]:.0f} ms'
                + (' (given)' if proj['step_ms_given'] else ''))
  ax1.title.set_fontsize(9)
  top = max([1.0] + [r.get('scaling_efficiency') or 0 for r in records])
  ax2.set(xscale='log', xlabel='devices', ylabel='speedup / devices', ylim=(0, 1.1 * top),
          title='Scaling efficiency vs one device')
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  return buffer.getvalue()


def table(records: list[dict[str, Any]]) -> str:
  """The printed table: one line per point."""
  head = (f'{"strategy":8s} {"dev":>4s} {"mesh":>5s} {"batch":>6s} {"img/s":>8s} {"eff":>5s} '
          f'{"compile":>7s} {"peak MB":>8s} {"sent MB":>8s} {"act MB":>7s} {"proj img/s":>10s}')
  lines = [head]
  fmt = lambda x, f: format('-', '>' + f.split('.')[0]) if x is None else format(x, f)
  for r in records:
    row = _row(r)
    lines.append(
        f'{row["parallelism"]:8s} {row["devices"]:4d} {row["mesh"]:>5s} '
        f'{row["batch_size"]:6d} {fmt(row["train_images_per_sec"], "8.1f")} '
        f'{fmt(row["scaling_efficiency"], "5.2f")} {row["compile_s"]:7.1f} '
        f'{fmt(row["peak_memory_mb"], "8.1f")} {row["sent_mb"]:8.2f} '
        f'{row["sent_activations_mb"]:7.2f} {row["projected_images_per_sec"]:10.1f}')
  return '\n'.join(lines)


def _ints(name: str, values: list[str]) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise UserError(f'--{name}={",".join(values)}: give whole numbers, e.g. 1,2,4,8') from None
  if any(v < 1 for v in out):
    raise UserError(f'--{name}: device counts must be >= 1')
  return out


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.cpu_devices:
    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)
  from alexnet_jax.core import config as config_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  if config is None:
    raise UserError('No configs/alexnet.py next to this installation: pass --config=FILE.')
  unknown = set(FLAGS.strategies) - set(config_lib.STRATEGIES)
  if unknown:
    raise UserError(f'--strategies: unknown {sorted(unknown)}; choose from '
                    f'{config_lib.STRATEGIES}')
  run_counts = _ints('devices', FLAGS.devices)
  paper_counts = _ints('project_devices', FLAGS.project_devices)
  if FLAGS.per_device_batch < 1 or FLAGS.steps < 1 or FLAGS.warmup < 0:
    raise UserError('--per_device_batch and --steps must be >= 1, --warmup >= 0')
  if FLAGS.bandwidth_gb_s <= 0 or FLAGS.latency_us < 0 or (FLAGS.step_ms or 1) <= 0:
    raise UserError('--bandwidth_gb_s and --step_ms must be > 0 and --latency_us >= 0')
  needed = max(run_counts + paper_counts)
  if needed > jax.device_count():
    raise UserError(f'{needed} devices asked for, {jax.device_count()} here'
                    + (' (add --cpu_devices=N)' if jax.default_backend() == 'cpu' else ''))
  config.dataset = 'synthetic'  # Data made on the devices: no dataset is read.
  cli.prepare_output(FLAGS.output, folder=True)
  config.batch_size = config.eval_batch_size = FLAGS.per_device_batch
  config_lib.validate(config, num_devices=1)
  kernels = kernels_lib.resolve(config)
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), {jax.device_count()} '
        f'devices, {os.cpu_count()} CPUs; model={config.model} dtype={config.dtype} '
        f'per-device batch={FLAGS.per_device_batch}; kernels: {kernels.describe()}', flush=True)
  plan = {('data', 1): True}  # The reference every point is compared with.
  for strategy in FLAGS.strategies:
    for n in paper_counts:
      plan.setdefault((strategy, n), False)
    for n in run_counts:
      plan[(strategy, n)] = True
  records, skipped = [], []
  for (strategy, n), measure in plan.items():
    try:
      record = _point(config, strategy, n, FLAGS.per_device_batch, measure, FLAGS.steps,
                      FLAGS.warmup, kernels)
    except ConfigError as e:
      skipped.append({'parallelism': strategy, 'devices': n, 'skipped': str(e)})
      print(f'skipped {strategy} on {n} devices: {e}', flush=True)
      continue
    records.append(record)
    speed = (f'{record["train_images_per_sec"]:.1f} img/s' if measure
             else 'compiled and counted only')
    print(f'{strategy} on {n} devices: {speed}, {record["bytes_sent"] / 2**20:.2f} MB sent per '
          f'device per step, compiled in {record["compile_s"]:.1f} s', flush=True)
  order = {s: i for i, s in enumerate(['data'] + FLAGS.strategies)}
  records.sort(key=lambda r: (order[r['parallelism']], r['devices']))
  project(records, FLAGS.bandwidth_gb_s, FLAGS.latency_us, FLAGS.step_ms)
  write(records, skipped, FLAGS.output)
  print(table(records))
  print(f'Wrote {FLAGS.output}/scaling.jsonl, scaling.csv and scaling.png')


if __name__ == '__main__':
  cli.run(main, _define_flags)
