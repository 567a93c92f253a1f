"""Speed of the paper's network: training step, evaluation, input pipeline, whole loop, devices.

  python -m alexnet_jax.bench.benchmark                        # train step, batch 128, fp32
  python -m alexnet_jax.bench.benchmark --what=train,eval,pipeline,loop --json
  python -m alexnet_jax.bench.benchmark --what=layers                     # each layer, both ways
  python -m alexnet_jax.bench.benchmark --what=layers --layers=conv1,pool1  # only these
  python -m alexnet_jax.bench.benchmark --config.dtype=bfloat16
  python -m alexnet_jax.bench.benchmark --cpu_devices=8 --devices=8 --config.parallelism=columns
  python -m alexnet_jax.bench.benchmark --peer=alexnet_jax/bench/peer_torch.py  # + PyTorch

Every measurement runs after a warm-up and synchronises on its result (block_until_ready), and
reports the median of --steps timed repetitions. The training step is the one training uses
(`core.parallel`'s step of config.parallelism: forward, backward, the gradient sums, SGD with
momentum and weight decay) on
synthetic data made on the device, so neither decoding nor host-to-device copies are timed;
'loop' adds them back (the input pipeline on real JPEGs feeding the step). The kernels are
resolved once (`core.kernels`), as training does, printed, and recorded in each train record.
Benchmarks are commands, not tests: record results in BENCHMARKS.md with the machine and the
date. Sweeps over strategies and device counts, with the bytes exchanged and projections, are
`python -m alexnet_jax.bench.scaling` (it measures each point with `measure_train`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
from ml_collections import config_flags

from alexnet_jax import cli
from alexnet_jax.errors import UserError

FLAGS = flags.FLAGS
MEASUREMENTS = ('train', 'eval', 'pipeline', 'loop', 'layers')
LAYERS = ('conv1', 'lrn1', 'pool1', 'conv2', 'conv3')  # those --what=layers times


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', cli.checkout_config('alexnet.py'),
                                  'Config whose network is measured (configs/alexnet.py).')
  flags.DEFINE_list('what', ['train'], f'Measurements, any of {MEASUREMENTS}.')
  flags.DEFINE_list('layers', list(LAYERS), f'--what=layers: which of {LAYERS}.')
  flags.DEFINE_integer('batch_size', None, 'Global batch (default: the config\'s, 128).')
  flags.DEFINE_integer('steps', 5, 'Timed repetitions (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed repetitions after compilation.')
  flags.DEFINE_integer('devices', 1, 'Devices for the train/eval/loop measurements.')
  flags.DEFINE_integer('cpu_devices', 0, 'Simulate this many CPU devices (set before JAX '
                       'starts; for --devices > 1 on a CPU).')
  flags.DEFINE_string('jpeg_dir', None, 'Folder of JPEGs for pipeline/loop (generated if '
                      'missing or too small; a temporary folder by default).')
  flags.DEFINE_integer('num_jpegs', 512, 'JPEGs to generate for pipeline/loop.')
  flags.DEFINE_string('peer', None, 'Path of a PyTorch peer script (the project\'s is '
                      'alexnet_jax/bench/peer_torch.py): run it (fp32, and bf16 '
                      'channels-last) right after the train step and print the ratio.')
  flags.DEFINE_list('peer_malloc', ['default', 'kept'], 'Run the peer with glibc\'s default '
                    'allocator settings, and/or "kept": the settings of --keep_freed_memory, '
                    'given by environment variables (the like-for-like comparison).')
  flags.DEFINE_bool('keep_freed_memory', True, 'glibc keeps and reuses freed memory in this '
                    'process (alexnet_jax.cpu; what main.py does). --nokeep_freed_memory '
                    'measures glibc\'s defaults.')
  flags.DEFINE_bool('json', False, 'Also print one JSON line per measurement.')


def forward_flops(config: Any) -> float:
  """Multiply-add FLOPs (2 per MAC) of one forward pass of one image, from the layer shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import models  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core.kernels import Kernels  # pylint: disable=g-import-not-at-top
  model = models.create_model(config, Kernels())  # Shapes only: the kernels do not matter.
  shapes = models.intermediate_shapes(model, config.image_size)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0),
                                                     config.image_size))
  flops = 0.0
  for name, layer in params.items():
    kernel = layer['kernel'].shape
    if len(kernel) == 4:  # conv: output positions x taps x (input channels per column).
      out = shapes[name + '_out']
      flops += 2.0 * out[1] * out[2] * kernel[0] * kernel[1] * kernel[2] * kernel[3]
    else:
      flops += 2.0 * kernel[0] * kernel[1]
  return flops


def _time(fn: Callable[[], Any], steps: int, warmup: int) -> tuple[float, float]:
  """(first call seconds, compilation included; median seconds of `steps` later calls)."""
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  times.sort()
  return first, times[len(times) // 2]


def _devices(num_devices: int) -> list:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()[:num_devices]
  if len(devices) < num_devices:
    raise UserError(f'--devices={num_devices} but only {len(devices)} are available '
                    '(on a CPU, add --cpu_devices=N)')
  return devices


def _setup(config: Any, num_devices: int, kernels):
  """Model, optimizer and replicated state on the first `num_devices` devices."""
  from alexnet_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import steps  # pylint: disable=g-import-not-at-top
  devices = _devices(num_devices)
  model, tx, state = steps.initial_state(config, kernels)
  return model, tx, parallel.replicate(state, devices), devices


def _device_images(shape: tuple, devices: list, seed: int = 0, sharding=None):
  """Random images made on the devices, [devices, per-device batch, ...] (or `shape` laid out
  as `sharding`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import parallel  # pylint: disable=g-import-not-at-top
  make = jax.jit(lambda k: jax.random.normal(k, shape) * 60.0,
                 out_shardings=sharding or parallel.device_axis_sharding(devices))
  return make(jax.random.key(seed))


def peak_memory_bytes(compiled: Any) -> int | None:
  """Peak bytes one device holds for a compiled step (arguments, results not aliased to them,
  and temporaries), from XLA's memory analysis; None where the backend gives none."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if isinstance(m, (list, tuple)):
    m = m[0] if m else None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def measure_train(config: Any, devices: int | list, steps_: int, warmup: int,
                  kernels=None, per_host: int | None = None) -> dict[str, Any]:
  """The training step of config.parallelism (`core.parallel`) on device-resident synthetic
  data, with `kernels` (default: resolved for this machine, as training does), over `devices`
  (a list, possibly spanning processes, or the first n local ones).

  Also records what the compiled step holds and exchanges: its peak memory per device and the
  bytes each device sends per step (`bench.collectives`, from the optimised HLO), split into
  activations (collectives inside the network) and gradients and metrics (the rest), and the
  part that crosses between hosts: the processes' own, or `per_host` consecutive devices taken
  as one host (a projection of a larger machine; count only).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alexnet_jax.bench import collectives as collectives_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import steps  # pylint: disable=g-import-not-at-top
  kernels = kernels or kernels_lib.resolve(config)
  devices = _devices(devices) if isinstance(devices, int) else devices
  num_devices = len(devices)
  model, tx, host = steps.initial_state(config, kernels)
  placement = parallel.Placement(config, model, tx, host, devices, per_host=per_host)
  # Logical device i of the compiled step (its place in the mesh, or in pmap's device list) and
  # the host it is on.
  order = (list(placement.mesh.devices.flat) if placement.mesh is not None
           else placement.devices)
  host_of = ([i // per_host for i in range(num_devices)] if per_host
             else [d.process_index for d in order])
  b, size = config.batch_size, config.image_size
  lr, stop = np.float32(config.learning_rate), placement.stop_votes(False)
  if placement.mesh is None:
    local = placement.local_devices
    per_device = parallel.device_axis_sharding(local)
    image_shape = (len(local), b // num_devices, size, size, 3)
    label_shape = image_shape[:2]
    batch_sharding = per_device
    state_shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((len(local),) + np.shape(x), np.asarray(x).dtype,
                                       sharding=per_device), host)
  else:
    image_shape, label_shape = (b, size, size, 3), (b,)
    batch_sharding = placement.batch_sharding
    state_shapes = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s), host,
        placement.shardings)
  batch_shapes = {'image': jax.ShapeDtypeStruct(image_shape, np.float32, sharding=batch_sharding),
                  'label': jax.ShapeDtypeStruct(label_shape, np.int32, sharding=batch_sharding)}
  holder = {}
  # In a run of several processes pmap lowers from this process's arrays, not from shapes, and
  # its compiled form is called through pmap itself (as training does).
  pmap_across = placement.mesh is None and jax.process_count() > 1
  if pmap_across:
    holder['state'] = placement.put_state(host)
    state_shapes, batch_shapes = holder['state'], _device_batch(batch_shapes)
  t0 = time.perf_counter()
  # Compiled from shapes alone: a count-only point (steps_=0) never holds the state, whose
  # copies on many simulated devices would not fit in the host's memory.
  compiled = placement.train_step.lower(state_shapes, batch_shapes, lr, stop).compile()
  compile_s = time.perf_counter() - t0
  found = collectives_lib.collectives(compiled.as_text(), num_devices)
  run = placement.train_step if pmap_across else compiled
  median = None  # steps_=0: compiled and counted only (points a projection cannot run)
  if steps_:
    batch = _device_batch(batch_shapes)
    holder.setdefault('state', placement.put_state(host))

    def step():
      holder['state'], m, _ = run(holder['state'], batch, lr, stop)
      return m

    median = _time(step, steps_, warmup)[1]
  flops = 3 * forward_flops(config) * b  # forward + backward (about twice the forward)
  mesh = list(placement.mesh.devices.shape) if placement.mesh else [num_devices, 1]
  return {'measurement': 'train', 'train_images_per_sec': median and b / median,
          'step_ms': median and median * 1e3,
          'compile_s': compile_s, 'devices': num_devices, 'batch_size': b,
          'hosts': len(set(host_of)), 'devices_per_host': num_devices // len(set(host_of)),
          'parallelism': config.parallelism, 'mesh': mesh,
          'dtype': config.dtype, 'model': config.model, 'image_size': config.image_size,
          'achieved_gflops': median and flops / median / 1e9,
          'peak_memory_bytes': peak_memory_bytes(compiled),
          'bytes_sent': collectives_lib.bytes_sent(found),
          'bytes_sent_activations': collectives_lib.bytes_sent(c for c in found if c.layer),
          'bytes_sent_between_hosts': collectives_lib.bytes_between_hosts(found, host_of),
          'num_collectives': len(found), **kernels.as_dict()}


def _device_batch(shapes: dict[str, Any]) -> dict[str, Any]:
  """Synthetic images (`_device_images`) and zero labels made on the devices, shaped and laid
  out as `shapes`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  image, label = shapes['image'], shapes['label']
  return {'image': _device_images(image.shape, None, sharding=image.sharding),
          'label': jax.make_array_from_callback(label.shape, label.sharding,
                                                lambda i: np.zeros(label.shape, np.int32)[i])}


def measure_eval(config: Any, num_devices: int, steps_: int, warmup: int,
                 ten_crop: bool) -> dict[str, Any]:
  """The evaluation step (centre crop or the 10-crop test) on synthetic data."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import parallel  # pylint: disable=g-import-not-at-top
  model, _, rstate, devices = _setup(config, num_devices, kernels_lib.resolve(config))
  b = config.eval_batch_size
  crops = (10,) if ten_crop else ()
  images = _device_images((num_devices, b // num_devices) + crops +
                          (config.image_size, config.image_size, 3), devices)
  batch = {'image': images, 'label': jnp.zeros((num_devices, b // num_devices), jnp.int32),
           'mask': jnp.ones((num_devices, b // num_devices), bool)}
  p_eval = parallel.pmapped_eval_step(model, devices)
  first, median = _time(lambda: p_eval(rstate.params, batch), steps_, warmup)
  return {'measurement': 'eval_ten_crop' if ten_crop else 'eval_center_crop',
          'eval_images_per_sec': b / median, 'step_ms': median * 1e3,
          'compile_s': max(first - median, 0.0), 'devices': num_devices, 'batch_size': b,
          'dtype': config.dtype, 'model': config.model}


def _jpeg_folder(directory: str | None, num: int) -> str:
  # pylint: disable-next=g-import-not-at-top
  from alexnet_jax.bench import pipeline as pipeline_benchmark
  directory = directory or os.path.join(tempfile.gettempdir(), 'alexnet_jax_bench_jpegs')
  if pipeline_benchmark.count_images(directory) < num:  # pylint: disable=protected-access
    print(f'Writing {num} ImageNet-sized JPEGs to {directory} ...', flush=True)
    pipeline_benchmark.write_jpegs(directory, num)
  return directory


def measure_pipeline(config: Any, directory: str, batches: int) -> dict[str, Any]:
  """The paper's training preprocessing (see pipeline_benchmark): with
  config.device_preprocessing from the prepared shards of the JPEGs, uint8 out; else from the
  full-size JPEGs, float32 out."""
  # pylint: disable-next=g-import-not-at-top
  from alexnet_jax.bench import pipeline as pipeline_benchmark
  r = pipeline_benchmark.benchmark(config, directory, batches, warmup=3,
                                   prepared=config.device_preprocessing)
  return {'measurement': 'pipeline', 'pipeline_images_per_sec': r['images_per_sec'],
          'source': r['source'], 'bytes_to_device_per_image': r['bytes_to_device_per_image'],
          'batch_size': r['batch_size'], 'num_files': r['num_files'], 'cpus': r['cpus']}


def measure_loop(config: Any, directory: str, num_devices: int, steps_: int,
                 warmup: int) -> dict[str, Any]:
  """The input pipeline feeding the training step, as in training: from the prepared shards of
  the JPEGs with the device finishing uint8 patches (config.device_preprocessing), else from
  the full-size JPEGs in float32."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import steps  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import stats  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import on_device  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from alexnet_jax.bench import pipeline as pipeline_benchmark
  config = config.copy_and_resolve_references()
  config.dataset, config.data_dir, config.eval_split = 'folder', directory, 'train'
  config.stats_num_images = 256
  device = config.device_preprocessing
  if device:
    config.data_dir, _ = pipeline_benchmark.prepared_copy(config, directory)
    config.dataset = 'prepared'
  model, tx, host = steps.initial_state(config, kernels_lib.resolve(config))
  lr = np.float32(config.learning_rate)
  with tempfile.TemporaryDirectory() as workdir:
    mean = stats.mean_to_subtract(config, stats.training_stats(config, workdir))
    placement = parallel.Placement(config, model, tx, host, _devices(num_devices),
                                   on_device.finisher(config, mean) if device else None)
    it = input_pipeline.train_iterator(config, mean=mean, on_device=device)
    # Fed as training feeds it: config.device_prefetch batches placed on the devices ahead.
    batches = placement.batches(it, config.device_prefetch)
    holder, stop = {'state': placement.put_state(host)}, placement.stop_votes(False)

    def step():
      holder['state'], m, _ = placement.train_step(holder['state'], next(batches), lr, stop)
      return m

    try:
      first, median = _time(step, steps_, warmup)
    finally:
      it.close()
  return {'measurement': 'loop', 'train_images_per_sec': config.batch_size / median,
          'step_ms': median * 1e3, 'compile_s': max(first - median, 0.0),
          'devices': num_devices, 'batch_size': config.batch_size, 'dtype': config.dtype,
          'device_prefetch': config.device_prefetch, 'source': config.dataset}


def measure_layers(batch: int, steps_: int, warmup: int,
                   layers: tuple[str, ...] = LAYERS) -> list[dict[str, Any]]:
  """Forward+backward of the `layers` that have two implementations, each way, paper sizes.

  What `ops` and `models.ColumnConv` choose between: conv1 (im2col vs XLA's strided
  convolution; kernel gradient only, as in training), LRN1 (hand-written vs autodiff gradient),
  pool1 (mask vs select-and-scatter gradient), conv2 (two half-convolutions vs
  feature_group_count=2), and conv1/conv2/conv3 by oneDNN where its calls are available.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from alexnet_jax import cpu  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import ops  # pylint: disable=g-import-not-at-top
  key = jax.random.key(0)
  image = jax.random.normal(key, (batch, 224, 224, 3)) * 60.0
  act1 = jax.nn.relu(jax.random.normal(key, (batch, 55, 55, 96)) * 50.0)
  pool1 = jax.random.normal(key, (batch, 27, 27, 96))
  w1 = jax.random.normal(key, (11, 11, 3, 96)) * 0.01
  w2 = jax.random.normal(key, (5, 5, 48, 256)) * 0.01
  pool2 = jax.random.normal(key, (batch, 13, 13, 256))
  w3 = jax.random.normal(key, (3, 3, 256, 384)) * 0.01
  pad1, pad2, pad3 = ((2, 2), (2, 2)), ((2, 2), (2, 2)), ((1, 1), (1, 1))

  def split2(x, w, backend='xla'):
    return jnp.concatenate([ops.conv(a, b, 1, pad2, backend=backend) for a, b in
                            zip(jnp.split(x, 2, -1), jnp.split(w, 2, -1))], -1)

  # (layer, implementation, f, inputs f is not differentiated by, inputs it is). Every array is
  # an argument of the compiled program: one it closed over would be a constant, and XLA folds
  # what depends on constants alone (conv1's kernel gradient at batch 4: computed while
  # compiling, for 12 s, then timed at 0.1 ms).
  cases = [
      ('conv1', 'im2col', lambda x, w: ops.conv_im2col(x, w, 4, pad1), (image,), (w1,)),
      ('conv1', 'direct', lambda x, w: ops.conv(x, w, 4, pad1), (image,), (w1,)),
      ('lrn1', 'custom', lambda x: ops.lrn(x, 2.0, 5, 1e-4, 0.75, 'custom'), (), (act1,)),
      ('lrn1', 'reduce_window', lambda x: ops.lrn(x, 2.0, 5, 1e-4, 0.75, 'reduce_window'), (),
       (act1,)),
      ('pool1', 'mask', lambda x: ops.max_pool(x, 3, 2, 'mask'), (), (act1,)),
      ('pool1', 'reduce_window', lambda x: ops.max_pool(x, 3, 2, 'reduce_window'), (), (act1,)),
      ('conv2', 'split', split2, (), (pool1, w2)),
      ('conv2', 'grouped', lambda x, w: ops.conv(x, w, 1, pad2, 2), (), (pool1, w2)),
      ('conv3', 'xla', lambda x, w: ops.conv(x, w, 1, pad3), (), (pool2, w3)),
  ]
  if jax.default_backend() == 'cpu' and cpu.onednn_available():
    cases += [
        ('conv1', 'onednn', lambda x, w: ops.conv(x, w, 4, pad1, backend='onednn'), (image,),
         (w1,)),
        ('conv2', 'split_onednn', lambda x, w: split2(x, w, 'onednn'), (), (pool1, w2)),
        ('conv3', 'onednn', lambda x, w: ops.conv(x, w, 1, pad3, backend='onednn'), (),
         (pool2, w3)),
    ]
  results = []
  for layer, impl, f, fixed, args in [c for c in cases if c[0] in layers]:

    def fwd_bwd(fixed, args, f=f):
      y, vjp = jax.vjp(lambda *a: f(*fixed, *a), *args)
      return vjp(jnp.ones_like(y))

    fn = jax.jit(fwd_bwd)
    _, median = _time(lambda fn=fn, fixed=fixed, args=args: fn(fixed, args), steps_, warmup)
    results.append({'measurement': 'layer', 'layer': layer, 'impl': impl,
                    'fwd_bwd_ms': median * 1e3, 'batch_size': batch})
  return results


def run_peer(peer: str, batch: int, steps_: int,
             malloc: tuple[str, ...] = ('default',)) -> list[dict[str, Any]]:
  """Runs the PyTorch peer script (fp32 NCHW, then bf16 channels-last) under each allocator
  setting in `malloc` ('default', or 'kept' = ours, by environment variables); [] without torch.
  """
  from alexnet_jax import cpu  # pylint: disable=g-import-not-at-top
  results = []
  cpu.release_freed_memory()  # Our kept heap must not crowd the peer's memory.
  for setting in malloc:
    env = dict(os.environ, **(cpu.malloc_env() if setting == 'kept' else {}))
    for extra in ([], ['--channels-last', '--bf16']):
      cmd = [sys.executable, peer, '--batch', str(batch), '--steps', str(steps_), '--json',
             *extra]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
      if proc.returncode != 0:
        print(f'Peer failed ({" ".join(cmd)}):\n{proc.stderr[-2000:]}', file=sys.stderr)
        return results
      results.append(dict(json.loads(proc.stdout.strip().splitlines()[-1]), malloc=setting))
  return results


def _print(result: dict[str, Any], as_json: bool) -> None:
  keys = [k for k in result if k != 'measurement']
  cells = ', '.join(f'{k}={result[k]:.{3 if k.startswith("ratio") else 1}f}'
                    if isinstance(result[k], float) else f'{k}={result[k]}' for k in keys)
  print(f'{result["measurement"]:>16s}: {cells}', flush=True)
  if as_json:
    print(json.dumps(result), flush=True)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from alexnet_jax import cpu  # pylint: disable=g-import-not-at-top
  kept = FLAGS.keep_freed_memory and cpu.keep_freed_memory()  # Before JAX starts its threads.
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.cpu_devices:
    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)
  from alexnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  if config is None:
    raise UserError('No configs/alexnet.py next to this installation: pass --config=FILE.')
  if FLAGS.batch_size:
    config.batch_size = config.eval_batch_size = FLAGS.batch_size
  unknown = set(FLAGS.what) - set(MEASUREMENTS)
  if unknown:
    raise UserError(f'--what: unknown {sorted(unknown)}; choose from {MEASUREMENTS}')
  unknown = set(FLAGS.layers) - set(LAYERS)
  if unknown:
    raise UserError(f'--layers: unknown {sorted(unknown)}; choose from {LAYERS}')
  unknown = set(FLAGS.peer_malloc) - {'default', 'kept'}
  if unknown:
    raise UserError(f'--peer_malloc: unknown {sorted(unknown)}; choose default, kept')
  if FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.devices < 1:
    raise UserError(f'--steps={FLAGS.steps} must be >= 1, --warmup={FLAGS.warmup} >= 0 and '
                    f'--devices={FLAGS.devices} >= 1')
  if FLAGS.peer and not os.path.isfile(FLAGS.peer):
    raise UserError(f'--peer={FLAGS.peer}: no such file; pass the path of '
                    'alexnet_jax/bench/peer_torch.py (the project\'s peer)')
  if not {'pipeline', 'loop'} & set(FLAGS.what):
    # The steps are measured on data made on the device: no dataset is read, and none of
    # TensorFlow, tensorflow-datasets or scikit-learn is imported (an accelerator image
    # without them can run this).
    config.dataset = 'synthetic'
  # Before any work; also checks that the batch divides over --devices.
  config_lib.validate(config, num_devices=FLAGS.devices)
  kernels = kernels_lib.resolve(config)
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), {jax.device_count()} '
        f'devices, {os.cpu_count()} CPUs; model={config.model} dtype={config.dtype} '
        f'batch={config.batch_size} malloc={"kept" if kept else "default"}', flush=True)
  print(f'kernels: {kernels.describe()}', flush=True)
  results = []
  if 'train' in FLAGS.what:
    results.append(dict(measure_train(config, FLAGS.devices, FLAGS.steps, FLAGS.warmup,
                                      kernels), malloc='kept' if kept else 'default'))
    _print(results[-1], FLAGS.json)
    if FLAGS.peer:
      for peer in run_peer(FLAGS.peer, config.batch_size, FLAGS.steps,
                           tuple(FLAGS.peer_malloc)):
        peer['measurement'] = ('peer_torch' + ('_bf16_cl' if peer['bf16'] else '_fp32') +
                               ('_kept' if peer['malloc'] == 'kept' else ''))
        peer['ratio_ours_to_peer'] = (results[0]['train_images_per_sec'] /
                                      peer['train_images_per_sec'])
        results.append(peer)
        _print(peer, FLAGS.json)
  if 'eval' in FLAGS.what:
    for ten_crop in (False, True):
      results.append(measure_eval(config, FLAGS.devices, FLAGS.steps, FLAGS.warmup, ten_crop))
      _print(results[-1], FLAGS.json)
  if 'pipeline' in FLAGS.what or 'loop' in FLAGS.what:
    directory = _jpeg_folder(FLAGS.jpeg_dir, FLAGS.num_jpegs)
    if 'pipeline' in FLAGS.what:
      results.append(measure_pipeline(config, directory, batches=max(FLAGS.steps, 10)))
      _print(results[-1], FLAGS.json)
    if 'loop' in FLAGS.what:
      results.append(measure_loop(config, directory, FLAGS.devices, FLAGS.steps, FLAGS.warmup))
      bare = [r for r in results if r['measurement'] == 'train']
      if bare:  # the loop against the bare step of the same run: 1.0 means fed in full
        results[-1]['ratio_loop_to_step'] = (results[-1]['train_images_per_sec'] /
                                             bare[0]['train_images_per_sec'])
      _print(results[-1], FLAGS.json)
  if 'layers' in FLAGS.what:
    for r in measure_layers(config.batch_size, FLAGS.steps, FLAGS.warmup, tuple(FLAGS.layers)):
      results.append(r)
      _print(r, FLAGS.json)


if __name__ == '__main__':
  cli.run(main, _define_flags)
