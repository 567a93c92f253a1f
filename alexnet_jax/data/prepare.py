"""One pass over a dataset into the paper's format (§2): 256x256 JPEG shards, an index, statistics.

  python -m alexnet_jax.data.prepare --source=imagenet2012 --data_dir=~/tensorflow_datasets \
      --output=~/imagenet256
  python -m alexnet_jax.data.prepare --source=folder --data_dir=ROOT --output=DIR

then train with `--config.dataset=prepared --config.data_dir=DIR`. The paper resized ImageNet
once to 256x256 and trained on that; decoding full-size JPEGs every epoch instead costs about
five times the work per image (BENCHMARKS.md, "Feeding an accelerator").

Each image goes through `sources.decode_center_square` (the function the pipeline applies to
unprepared sources: short side to --resize_size, the central square), is rounded to uint8 and
re-encoded as a JPEG of --quality. The shards are TFRecord files of tf.train.Example records
{'image': JPEG bytes, 'label': int64} that tf.data reads natively; the training split is put in
a seeded random order first, so every shard holds a sample of all classes.

The same pass sums the training squares (`stats.StatsSums`) into OUTPUT/stats.npz: §2's mean
image and RGB mean and §4.1's PCA of the RGB covariance, where a run of dataset='prepared' finds
them. OUTPUT/index.json (counts, shards, class names, the settings, the unreadable files) is
written last: a folder without it is a preparation still under way.

Work is split by shard over --workers processes (default: every core). Progress, with an ETA,
is logged after each shard; an interrupted preparation resumes with the same command, redoing
only the shards not yet recorded in OUTPUT/.progress/. Images that cannot be decoded are
skipped, counted and listed in the index. ImageNet's oddities decode as images: CMYK and
greyscale JPEGs (TensorFlow's decoder converts them to RGB) and PNG files named .JPEG (the
decoder follows the content, not the name).
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import concurrent.futures
import dataclasses
import datetime
import io
import json
import multiprocessing
import os
import time
from typing import Any

from absl import logging
import numpy as np

from alexnet_jax import cli
from alexnet_jax import config as config_lib
from alexnet_jax import errors
from alexnet_jax import paths
from alexnet_jax.data import augment
from alexnet_jax.data import sources
from alexnet_jax.data import stats as data_stats
from alexnet_jax.errors import DataError
from alexnet_jax.errors import UserError
from alexnet_jax.progress import format_duration

# Measured on 256x256 squares of photographs (BENCHMARKS.md): quality 90 leaves an RMS error of
# 3.6-4.3 levels of 255, below the colour shift §4.1's PCA lighting adds on purpose (std about
# 5.5 levels along the first component); the quality FFCV's ImageNet example stores. 95 costs
# 1.4x the bytes, 85 saves 20%.
DEFAULT_QUALITY = 90
DEFAULT_SHARD_SIZE = 1024  # images per shard: ~20 MB files for ImageNet, 1,252 training shards.
SHUFFLE_SEED = 0  # the one-time order of the training split's files ('folder').
PROGRESS_DIR = '.progress'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a preparation makes; a resumed preparation must have the same."""
  source: str  # 'folder' or a TFDS name
  data_dir: str | None
  splits: tuple[str, ...]
  train_split: str
  resize_size: int
  antialias: bool
  quality: int
  shard_size: int


@dataclasses.dataclass(frozen=True)
class Shard:
  """One unit of work: the examples of one output file."""
  split: str
  index: int
  num_shards: int
  # 'folder': ((path, label), ...); TFDS: the record range (start, stop) of the split.
  items: tuple[tuple[str, int], ...] | tuple[int, int]

  @property
  def filename(self) -> str:
    return sources.prepared_shard_name(self.split, self.index, self.num_shards)

  @property
  def key(self) -> str:
    return f'{self.split}/{self.index}'


# ---------------------------------------------------------------------------- the plan


def _source_config(settings: Settings):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({'dataset': settings.source, 'data_dir': settings.data_dir,
                                    'train_split': settings.train_split})


def plan(settings: Settings) -> tuple[tuple[str, ...], list[Shard]]:
  """(class names, the shards of every split): a pure function of `settings` and the source."""
  config = _source_config(settings)
  shards = []

  def chunks(split, items):
    n = max(1, -(-len(items) // settings.shard_size))
    for i in range(n):
      shards.append(Shard(split, i, n, items[i * settings.shard_size:(i + 1) *
                                            settings.shard_size]))

  if settings.source == 'folder':
    classes = sources.folder_class_names(config)
    class_index = {name: i for i, name in enumerate(classes)}
    for split in settings.splits:
      # pylint: disable-next=protected-access
      _, files = sources.list_folder(sources.split_dir(config, split))
      unknown = sorted({c for _, c in files if c not in class_index})
      if unknown:
        raise DataError(f'Classes {unknown[:5]} of split {split!r} are not folders of the train '
                        f'split {settings.train_split!r} in {settings.data_dir}.')
      items = [(path, class_index[c]) for path, c in files]
      if split == settings.train_split:
        order = np.random.RandomState(SHUFFLE_SEED).permutation(len(items))
        items = [items[i] for i in order]
      chunks(split, tuple(items))
    return classes, shards
  builder = sources.tfds_builder(config)
  classes = tuple(builder.info.features['label'].names)
  for split in settings.splits:
    try:
      n = sources.tfds_num_examples(builder, split)  # pylint: disable=protected-access
    except (KeyError, ValueError) as e:
      raise DataError(f'{settings.source} has no split {split!r} ({errors.one_line(e)}); its splits '
                      f'are {sorted(builder.info.splits)}') from None
    ranges = [(a, min(a + settings.shard_size, n)) for a in range(0, n, settings.shard_size)]
    shards.extend(Shard(split, i, len(ranges), r) for i, r in enumerate(ranges))
  return classes, shards


# ---------------------------------------------------------------------------- one shard


_WORKER: dict[str, Any] = {}


def _init_worker() -> None:
  """A worker process: one TensorFlow thread (the processes are the parallelism)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow already started in this process (workers=1).
    pass


def _square_encoder(settings: Settings):
  """tf.function: encoded image -> (uint8 square [R, R, 3], JPEG bytes of it)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  key = (settings.resize_size, settings.antialias, settings.quality)
  if _WORKER.get('key') != key:

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def encode(encoded):
      square = augment.to_uint8(sources.decode_center_square(encoded, settings.resize_size,
                                                             settings.antialias))
      return square, tf.io.encode_jpeg(square, quality=settings.quality)

    _WORKER.update(key=key, encode=encode)
  return _WORKER['encode']


def _examples(settings: Settings, shard: Shard):
  """(description, label, encoded bytes or an exception) of the shard's examples, in order."""
  if settings.source == 'folder':
    for path, label in shard.items:
      try:
        with open(path, 'rb') as f:
          yield path, label, f.read()
      except OSError as e:
        yield path, label, e
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  start, stop = shard.items
  builder = tfds.builder(settings.source, data_dir=settings.data_dir)
  ds = builder.as_dataset(split=f'{shard.split}[{start}:{stop}]', shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  for i, ex in enumerate(ds.as_numpy_iterator()):
    name = ex.get('file_name', b'').decode() or f'{settings.source}[{shard.split}][{start + i}]'
    yield name, int(ex['label']), ex['image']


def prepare_shard(settings: Settings, shard: Shard, output: str) -> dict[str, Any]:
  """Writes one shard (whole or not at all) and returns what the index and statistics need:
  {'num_examples', 'bytes', 'unreadable': [(source, error)], 'sums': StatsSums arrays or None}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  encode = _square_encoder(settings)
  is_train = shard.split == settings.train_split
  sums = data_stats.StatsSums(settings.resize_size) if is_train else None
  path = paths.resolve(output) / shard.filename
  tmp = str(path) + '.tmp'
  count, unreadable = 0, []
  with tf.io.TFRecordWriter(tmp) as writer:
    for name, label, data in _examples(settings, shard):
      try:
        if isinstance(data, Exception):
          raise data
        square, jpeg = encode(tf.constant(data))
      except (tf.errors.OpError, OSError, ValueError) as e:
        unreadable.append((name, sources.unreadable_reason(e)))
        continue
      writer.write(sources.prepared_record(jpeg.numpy(), label))
      if sums is not None:
        sums.add(square.numpy())
      count += 1
  os.replace(tmp, path)
  return {'num_examples': count, 'bytes': os.path.getsize(path), 'unreadable': unreadable,
          'sums': sums.arrays() if sums is not None else None}


def _work(args) -> tuple[str, dict[str, Any]]:  # the pool's task: one shard.
  settings, shard, output = args
  return shard.key, prepare_shard(settings, shard, output)


# ---------------------------------------------------------------------------- progress


class _Progress:
  """What is done, in one file renamed into place after every shard (OUTPUT/.progress/
  progress.npz): the settings, each finished shard's counts, and the statistics' running sums.
  The sums and the list of shards they include change together, so a crash at any moment counts
  no shard twice and none not at all; a shard written but not recorded is redone."""

  def __init__(self, output: str, settings: Settings):
    self.file = paths.resolve(output) / PROGRESS_DIR / 'progress.npz'
    self.settings = settings
    self.done: dict[str, dict[str, Any]] = {}
    self.sums = data_stats.StatsSums(settings.resize_size)
    if self.file.exists():
      with np.load(io.BytesIO(self.file.read_bytes())) as data:
        state = json.loads(str(data['state']))
        arrays = {k: data[k] for k in data.files if k != 'state'}
      if state['settings'] != _settings_json(settings):
        raise UserError(
            f'{output} holds a preparation with other settings ({state["settings"]}); '
            f'give another --output, or remove {output} to start again.')
      self.done = state['done']
      self.sums = data_stats.StatsSums.from_arrays(arrays)
      logging.info('Resuming the preparation in %s: %d shards already done.', output,
                   len(self.done))

  def record(self, key: str, result: dict[str, Any]) -> None:
    if result['sums'] is not None:
      self.sums.merge(data_stats.StatsSums.from_arrays(result['sums']))
    self.done[key] = {k: v for k, v in result.items() if k != 'sums'}
    state = json.dumps({'settings': _settings_json(self.settings), 'done': self.done})
    buffer = io.BytesIO()
    np.savez(buffer, state=np.str_(state), **self.sums.arrays())
    paths.write_atomic(self.file, buffer.getvalue())


def _settings_json(settings: Settings) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(settings)))


# ---------------------------------------------------------------------------- the whole pass


def prepare(settings: Settings, output: str, workers: int | None = None) -> dict[str, Any]:
  """Prepares every split of `settings` into `output` (resuming what is there); returns the
  index it writes to output/index.json."""
  start = time.time()
  output = str(paths.resolve(output))
  index_file = paths.resolve(output) / sources.PREPARED_INDEX
  if index_file.exists():
    index = json.loads(index_file.read_text())
    if index['settings'] != _settings_json(settings):
      raise UserError(f'{output} holds a finished preparation with other settings '
                      f'({index["settings"]}); give another --output.')
    logging.info('%s is already prepared (%s).', output, sources.PREPARED_INDEX)
    return index
  classes, shards = plan(settings)
  if settings.train_split not in settings.splits:
    raise UserError(f'--splits={",".join(settings.splits)} lacks the training split '
                    f'{settings.train_split!r}, whose statistics the preparation computes.')
  paths.resolve(output).mkdir(parents=True, exist_ok=True)
  progress = _Progress(output, settings)
  todo = [s for s in shards if s.key not in progress.done]
  total_images = sum(_size(s) for s in shards)
  todo_images = sum(_size(s) for s in todo)
  workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
  logging.info('Preparing %d images of %s (%s) into %s: %d shards, %d to do, %d workers.',
               total_images, settings.source, ', '.join(settings.splits), output, len(shards),
               len(todo), workers)
  done_images, t0 = 0, time.time()

  def finished(key, result, shard):
    nonlocal done_images
    progress.record(key, result)
    done_images += _size(shard)
    rate = done_images / max(time.time() - t0, 1e-9)
    logging.info('%d/%d shards (%s), %d/%d images, %.0f images/s, ETA %s', len(progress.done),
                 len(shards), shard.filename, total_images - todo_images + done_images,
                 total_images, rate, format_duration((todo_images - done_images) / rate))

  by_key = {s.key: s for s in todo}
  if workers == 1:
    _init_worker()
    for shard in todo:
      finished(shard.key, prepare_shard(settings, shard, output), shard)
  else:
    context = multiprocessing.get_context('spawn')  # TensorFlow is not fork-safe.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_init_worker) as pool:
      futures = [pool.submit(_work, (settings, s, output)) for s in todo]
      try:
        for future in concurrent.futures.as_completed(futures):
          key, result = future.result()
          finished(key, result, by_key[key])
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
  return _finish(settings, output, classes, shards, progress, time.time() - start)


def _size(shard: Shard) -> int:
  if shard.items and isinstance(shard.items[0], tuple):
    return len(shard.items)
  return shard.items[1] - shard.items[0] if shard.items else 0


def _finish(settings: Settings, output: str, classes, shards: list[Shard], progress: _Progress,
            seconds: float) -> dict[str, Any]:
  """Writes stats.npz, then index.json (last: its presence means the preparation is whole),
  and removes the progress records."""
  stats = progress.sums.finish(settings.source)
  stats['dataset'] = np.str_(sources.PREPARED)
  data_stats.save_stats(str(paths.resolve(output) / sources.PREPARED_STATS), stats)
  splits = {}
  for split in settings.splits:
    mine = [s for s in shards if s.split == split]
    results = [progress.done[s.key] for s in mine]
    unreadable = [{'source': name, 'error': error} for r in results
                  for name, error in r['unreadable']]
    splits[split] = {
        'num_examples': sum(r['num_examples'] for r in results),
        'bytes': sum(r['bytes'] for r in results),
        'shards': [{'file': s.filename, 'num_examples': r['num_examples']}
                   for s, r in zip(mine, results)],
        'num_unreadable': len(unreadable), 'unreadable': unreadable}
    if unreadable:
      logging.warning('%s: %d unreadable images skipped (listed in %s), e.g. %s: %s', split,
                      len(unreadable), sources.PREPARED_INDEX, unreadable[0]['source'],
                      unreadable[0]['error'])
  index = {'format': sources.PREPARED_FORMAT, 'settings': _settings_json(settings),
           'class_names': list(classes), 'splits': splits,
           'stats': {'file': sources.PREPARED_STATS, 'split': settings.train_split,
                     'num_images': int(stats['num_images'])},
           'seconds': round(seconds, 1),
           'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  paths.write_atomic(paths.resolve(output) / sources.PREPARED_INDEX, json.dumps(index, indent=1))
  progress.file.parent.rmtree(missing_ok=True)
  for split, info in splits.items():
    n = max(info['num_examples'], 1)
    logging.info('%s: %d images, %d unreadable, %.1f KB per image, %.2f GB in %d shards', split,
                 info['num_examples'], info['num_unreadable'], info['bytes'] / n / 1e3,
                 info['bytes'] / 1e9, len(info['shards']))
  return index


# ---------------------------------------------------------------------------- command line


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('source', 'imagenet2012', "'folder' (DATA_DIR/<split>/<class>/*.jpg) or "
                      'the name of a prepared TFDS dataset (e.g. imagenet2012).')
  flags.DEFINE_string('data_dir', None, 'The folder root, or the TFDS data_dir.')
  flags.DEFINE_string('output', None, 'Folder to write the prepared dataset to (resumed if it '
                      'holds an interrupted preparation of the same settings).')
  flags.DEFINE_list('splits', ['train', 'validation'], 'Splits to prepare.')
  flags.DEFINE_string('train_split', 'train', 'The split whose statistics are computed.')
  flags.DEFINE_integer('resize_size', 256, '§2: the side of the square images.')
  flags.DEFINE_bool('antialias', True, 'Antialiased resize (config.resize_antialias).')
  flags.DEFINE_integer('quality', DEFAULT_QUALITY, 'JPEG quality of the squares (1-100).')
  flags.DEFINE_integer('shard_size', DEFAULT_SHARD_SIZE, 'Images per shard file.')
  flags.DEFINE_integer('workers', None, 'Processes (default: one per core).')


def main(argv) -> None:
  """Checks the flags, prepares, prints the summary."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.output:
    raise UserError('--output=DIR is required: the folder the prepared dataset goes to.')
  if not 1 <= f.quality <= 100:
    raise UserError(f'--quality={f.quality}: a JPEG quality is 1..100 (default '
                    f'{DEFAULT_QUALITY}).')
  for name in ('resize_size', 'shard_size'):
    if f[name].value < 1:
      raise UserError(f'--{name}={f[name].value}: must be >= 1.')
  if f.workers is not None and f.workers < 1:
    raise UserError(f'--workers={f.workers}: must be >= 1.')
  if not f.splits:
    raise UserError('--splits is empty: name the splits to prepare (e.g. train,validation).')
  if f.source == 'folder' and not f.data_dir:
    raise UserError('--source=folder needs --data_dir=ROOT (ROOT/<split>/<class>/*.jpg).')
  if f.source != 'folder':
    if f.source in config_lib.BUILTIN_DATASETS or not config_lib.is_registered_tfds(
        f.source):
      raise UserError(f"--source={f.source!r}: 'folder' or a dataset of the installed "
                      'tensorflow-datasets (e.g. imagenet2012).')
  settings = Settings(source=f.source, data_dir=str(paths.resolve(f.data_dir)) if f.data_dir
                      else None, splits=tuple(f.splits), train_split=f.train_split,
                      resize_size=f.resize_size, antialias=f.antialias, quality=f.quality,
                      shard_size=f.shard_size)
  if settings.source == 'folder':  # a missing split folder: one line, and no --output made
    for split in settings.splits:
      sources.split_dir(_source_config(settings), split)  # pylint: disable=protected-access
  cli.prepare_output(f.output, folder=True)
  index = prepare(settings, f.output, f.workers)
  for split, info in index['splits'].items():
    print(f'{split}: {info["num_examples"]} images ({info["num_unreadable"]} unreadable), '
          f'{info["bytes"] / max(info["num_examples"], 1) / 1e3:.1f} KB per image, '
          f'{len(info["shards"])} shards')
  print(f'Wrote {f.output} in {index["seconds"]:.0f} s; train with --config.dataset=prepared '
        f'--config.data_dir={f.output}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
