"""Input-pipeline throughput: the paper's training preprocessing, from full-size JPEGs or from
the prepared 256x256 shards.

  python -m alexnet_jax.bench.pipeline --num_images=512 --batches=20 [--dir=bench_data] \
      [--config=configs/alexnet.py]
  python -m alexnet_jax.bench.pipeline --prepared --num_images=2048 --batches=40
  taskset -c 0 python -m alexnet_jax.bench.pipeline --prepared ...   # one core

Writes `num_images` JPEGs of ImageNet-like sizes (about 500x375, some portrait, some larger) with
smooth, natural-looking content into --dir (reused if it already holds them; a temporary folder
by default), then times `data.pipeline.train_iterator` with --config (configs/alexnet.py):
- default, dataset='folder': decode of the central square, resize to 256, mean image, random 224
  crop, flip and PCA lighting, float32 batches of 128, as with --config.device_preprocessing
  False;
- --prepared: the folder is first prepared (`data.prepare`, timed: images/s per worker) into
  DIR_prepared, then read as dataset='prepared' with the device's share left out (uint8 patches,
  crop positions and lighting shifts, `on_device=True`): what the host does per image when the
  device finishes it. Reports the bytes per image sent to the device.
Prints images/second after --warmup batches, and a JSON line. Run it on a quiet machine: it uses
every core it may (pin it with taskset to measure fewer).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from alexnet_jax import cli
from alexnet_jax import config as config_lib
from alexnet_jax import cpu
from alexnet_jax.errors import UserError

# ImageNet's typical image is 500x375 (4:3); the long side varies around it.
TYPICAL_LONG_SIDE = 500
LONG_SIDE_RANGE = (320, 900)
ASPECT_RATIOS = (4 / 3, 4 / 3, 3 / 2, 1.0, 3 / 4)  # width / height; 4:3 landscape most often.
JPEG_QUALITY = 90
NUM_CLASSES = 10
# (grid cells along the short side, weight): coarse structure strong, fine detail weak (~1/f).
OCTAVES = ((3, 1.0), (8, 0.6), (24, 0.4), (80, 0.3), (240, 0.25))
# Pixel-level grain (std, 0..255 scale): photographs' sensor noise and texture, which is what
# brings the files to ImageNet's typical ~110 KB at this size and quality.
GRAIN_STD = 8.0


def natural_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """uint8 [height, width, 3]: 1/f-like coloured noise plus a few blobs, like a photograph.

  Smooth content matters for a fair benchmark: JPEG decoding time depends on how much detail
  the file holds, and white noise would make files (and decodes) several times too big.
  """
  image = np.zeros([height, width, 3], np.float32)
  for cells, weight in OCTAVES:
    low = rng.normal(0.0, 1.0, [cells, max(2, cells * width // height), 3])
    low = ((low - low.min()) / (np.ptp(low) + 1e-6) * 255).astype(np.uint8)
    image += weight * np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC),
                                 np.float32)
  image = image / sum(weight for _, weight in OCTAVES)  # back to 0..255.
  yy, xx = np.mgrid[0:height, 0:width]
  for _ in range(rng.integers(2, 6)):  # a few soft-edged objects
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
    inside = np.clip(1.5 - ((yy - cy) / ry)**2 - ((xx - cx) / rx)**2, 0, 1)[..., None]
    image = image * (1 - inside) + inside * rng.uniform(0, 255, 3)
  image += rng.normal(0.0, GRAIN_STD, image.shape[:2] + (1,)) + rng.normal(0.0, GRAIN_STD / 2,
                                                                          image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(directory: str, num_images: int, *, split: str = 'train', seed: int = 0,
                num_classes: int = NUM_CLASSES, long_side: int | None = None) -> None:
  """Writes num_images JPEGs as directory/<split>/class_XX/img_XXXXX.jpg (the 'folder' layout).

  long_side: a fixed long side for every image (tests use small images); None: ImageNet-like.
  """
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    side = long_side or int(np.clip(rng.normal(TYPICAL_LONG_SIDE, 80), *LONG_SIDE_RANGE))
    aspect = ASPECT_RATIOS[rng.integers(len(ASPECT_RATIOS))]
    width, height = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
    folder = os.path.join(directory, split, f'class_{i % num_classes:02d}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(natural_image(rng, width, height)).save(
        os.path.join(folder, f'img_{i:05d}.jpg'), quality=JPEG_QUALITY)


def count_images(directory: str) -> int:
  return sum(len(files) for _, _, files in os.walk(os.path.join(directory, 'train')))


def folder_settings(directory: str, shard_size: int, resize_size: int = 256,
                    antialias: bool = True):
  """The preparation (`data.prepare.Settings`) of the JPEGs in directory/train, at the default
  JPEG quality."""
  from alexnet_jax.data import prepare  # pylint: disable=g-import-not-at-top
  return prepare.Settings(source='folder', data_dir=directory, splits=('train',),
                          train_split='train', resize_size=resize_size, antialias=antialias,
                          quality=prepare.DEFAULT_QUALITY, shard_size=shard_size)


def prepared_copy(config, directory: str) -> tuple[str, dict]:
  """directory/train prepared once into directory + '_prepared' (reused when finished there);
  returns the folder and {'prepare_images_per_sec', 'prepare_workers', 'bytes_per_image'}."""
  from alexnet_jax.data import prepare  # pylint: disable=g-import-not-at-top
  output = directory.rstrip('/') + '_prepared'
  settings = folder_settings(directory, prepare.DEFAULT_SHARD_SIZE // 4, config.resize_size,
                             config.resize_antialias)
  fresh = not os.path.exists(os.path.join(output, 'index.json'))
  start = time.perf_counter()
  index = prepare.prepare(settings, output, workers=cpu.usable_cores())
  seconds = time.perf_counter() - start
  train = index['splits']['train']
  out = {'bytes_per_stored_image': round(train['bytes'] / train['num_examples'])}
  if fresh:
    out.update(prepare_images_per_sec=round(train['num_examples'] / seconds, 1),
               prepare_workers=cpu.usable_cores())
  return output, out


def _images_per_sec(batches_iter, batches: int, warmup: int, batch_size: int) -> float:
  """Images/second of `batches` batches of `batch_size` after `warmup` untimed ones."""
  for _ in range(warmup):
    next(batches_iter)
  start = time.perf_counter()
  for _ in range(batches):
    next(batches_iter)
  return batches * batch_size / (time.perf_counter() - start)


def _on_cores(n: int):
  """A context pinning this process (every thread of TensorFlow's pools) to its first n CPUs."""
  import contextlib  # pylint: disable=g-import-not-at-top

  @contextlib.contextmanager
  def pinned():
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(allowed[:n]))
    try:
      yield
    finally:
      os.sched_setaffinity(0, set(allowed))

  return pinned()


def compare_readers(config, directory: str, batches: int, warmup: int,
                    cores: tuple[int, ...] = (1, 2), rounds: int = 3) -> list[dict]:
  """On the prepared shards of directory/train, for each core count: ours (`train_iterator`,
  uint8 patches, crop positions and lighting shifts for the device), a plain tf.data reader
  of the same shards (parse, decode, random crop, flip, batch: nothing else) and the bare
  decode of the same JPEG bytes held in memory; images/second and ours as a ratio to each.

  The three take turns, `rounds` times, each turn a fresh iterator (nothing of another reader
  runs while one is timed); each reader's figure is its median turn, so that a slow spell of a
  shared machine lowers one turn of each rather than one reader."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import stats  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.dataset, config.eval_split = 'prepared', 'train'
  config.data_dir, _ = prepared_copy(config, directory)
  b, size = config.batch_size, config.image_size
  files = list(sources.open_split(config, 'train').files)
  records = tf.data.TFRecordDataset(files)
  jpegs = [r.numpy() for r in records.map(lambda r: sources.parse_prepared(r)['encoded'])]

  def plain():
    def example(record):
      ex = sources.parse_prepared(record)
      image = tf.io.decode_jpeg(ex['encoded'], channels=3)
      image = tf.image.random_crop(image, [size, size, 3])
      return tf.image.random_flip_left_right(image), ex['label']
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).repeat()
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(b, drop_remainder=True)
    return iter(ds.prefetch(tf.data.AUTOTUNE))

  def bare():
    ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().map(
        lambda x: tf.io.decode_jpeg(x, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
    return iter(ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

  def timed(make) -> float:
    batches_iter = make()
    try:
      return _images_per_sec(batches_iter, batches, warmup, b)
    finally:
      if hasattr(batches_iter, 'close'):
        batches_iter.close()
      del batches_iter
      gc.collect()

  results = []
  with tempfile.TemporaryDirectory() as workdir:
    mean = stats.mean_to_subtract(config, stats.training_stats(config, workdir))
    readers = {'ours': lambda: input_pipeline.train_iterator(config, mean=mean, on_device=True),
               'plain_tf_data': plain, 'bare_decode': bare}
    for n in cores:
      if n > cpu.usable_cores():
        continue
      turns = {name: [] for name in readers}
      with _on_cores(n):
        for _ in range(rounds):
          for name, make in readers.items():
            turns[name].append(timed(make))
      row = {'cores': n, **{name: float(np.median(t)) for name, t in turns.items()}}
      row.update(ours_vs_plain=row['ours'] / row['plain_tf_data'],
                 ours_vs_bare_decode=row['ours'] / row['bare_decode'],
                 images=len(jpegs), batch_size=b, rounds=rounds,
                 turns={name: [round(x) for x in t] for name, t in turns.items()})
      results.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
  return results


def benchmark(config, directory: str, batches: int, warmup: int, batch_size: int | None = None,
              antialias: bool | None = None, prepared: bool = False) -> dict:
  """Times train_iterator of `config` on directory/train (or its prepared copy); returns
  images/second, bytes per image sent to the device, and the settings."""
  # Imported here: TensorFlow and JAX start only after the files exist.
  from alexnet_jax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import stats  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.dataset, config.data_dir, config.eval_split = 'folder', directory, 'train'
  config.stats_num_images = 256  # the mean image is computed before timing starts.
  if batch_size:
    config.batch_size = batch_size
  if antialias is not None:
    config.resize_antialias = antialias
  antialias = config.resize_antialias
  extra = {}
  if prepared:
    config.data_dir, extra = prepared_copy(config, directory)
    config.dataset = 'prepared'
  with tempfile.TemporaryDirectory() as workdir:
    mean = stats.mean_to_subtract(config, stats.training_stats(config, workdir))
    iterator = input_pipeline.train_iterator(config, mean=mean, on_device=prepared)
    for _ in range(warmup):
      batch = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
  sent = sum(x.nbytes for x in batch.values()) / config.batch_size
  return {'images_per_sec': round(batches * config.batch_size / seconds, 1),
          'source': 'prepared' if prepared else 'folder', 'bytes_to_device_per_image': sent,
          'batch_size': config.batch_size, 'batches': batches, 'seconds': round(seconds, 3),
          'num_files': count_images(directory), 'cpus': cpu.usable_cores(),
          'antialias': antialias,
          **extra}


def _define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', cli.checkout_config('alexnet.py'),
                                  'Config whose training pipeline is timed.')
  flags.DEFINE_integer('num_images', 512, 'JPEGs to generate (if --dir has fewer).')
  flags.DEFINE_integer('batches', 20, 'Batches timed after the warm-up.')
  flags.DEFINE_integer('warmup', 5, 'Batches before the clock starts (fills the buffers).')
  flags.DEFINE_integer('batch_size', None, 'Override config.batch_size (default 128).')
  flags.DEFINE_string('dir', None, 'Folder for the JPEGs, reused if present (default: temp).')
  flags.DEFINE_bool('antialias', None, 'Antialiased resize to 256 (default: the config\'s '
                    'resize_antialias).')
  flags.DEFINE_bool('prepared', False, 'Prepare the JPEGs once (timed) and read the prepared '
                    'shards, uint8 to the device, instead of the full-size JPEGs.')
  flags.DEFINE_bool('compare', False, 'On the prepared shards, on 1 and 2 cores: ours against a '
                    'plain tf.data reader and against the bare JPEG decode (ratios).')
  flags.DEFINE_integer('rounds', 3, '--compare: turns of each reader, taken in rotation; each '
                       "reader's figure is its median turn.")


def main(argv) -> None:
  """Generates the JPEGs if needed, runs the benchmark, prints the result."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.config is None:
    raise UserError('No configs/alexnet.py next to this installation: pass --config=FILE.')
  for name, least in (('num_images', 1), ('batches', 1), ('rounds', 1), ('warmup', 0)):
    if f[name].value < least:
      raise UserError(f'--{name}={f[name].value} must be >= {least}')
  config = f.config
  if f.batch_size:
    config.batch_size = f.batch_size
  config_lib.validate(config, num_devices=1)
  if f.dir:
    cli.prepare_output(f.dir, flag='dir', folder=True)
  with tempfile.TemporaryDirectory() as scratch:
    directory = f.dir or scratch
    if count_images(directory) < f.num_images:
      start = time.perf_counter()
      write_jpegs(directory, f.num_images)
      print(f'Wrote {f.num_images} JPEGs to {directory} in {time.perf_counter() - start:.1f} s')
    if f.compare:
      rows = compare_readers(config, directory, f.batches, f.warmup, rounds=f.rounds)
      print(f'{"cores":>5s} {"ours":>8s} {"plain":>8s} {"decode":>8s} {"ours/plain":>10s} '
            f'{"ours/decode":>11s}   (images/s, {rows[0]["images"]} prepared images)')
      for r in rows:
        print(f'{r["cores"]:5d} {r["ours"]:8.1f} {r["plain_tf_data"]:8.1f} '
              f'{r["bare_decode"]:8.1f} {r["ours_vs_plain"]:10.2f} {r["ours_vs_bare_decode"]:11.2f}')
        print(json.dumps(r))
      return
    result = benchmark(config, directory, f.batches, f.warmup, f.batch_size, f.antialias,
                       f.prepared)
  if 'prepare_images_per_sec' in result:
    print(f'Prepared {result["num_files"]} images at {result["prepare_images_per_sec"]:.1f} '
          f'images/s with {result["prepare_workers"]} workers '
          f'({result["bytes_per_stored_image"] / 1e3:.1f} KB per stored image)')
  print(f'{result["images_per_sec"]:.1f} images/s from {result["source"]} (batch '
        f'{result["batch_size"]}, {result["batches"]} batches, {result["num_files"]} files, '
        f'{result["cpus"]} CPUs), {result["bytes_to_device_per_image"] / 1e3:.1f} KB per image '
        'to the device')
  print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main, _define_flags)
