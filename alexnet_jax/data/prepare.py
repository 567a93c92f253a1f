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

One process does the work: tf.data decodes, resizes and encodes the images on --workers
threads (default: one per core), and the shards are written in order as their images arrive.
(Worker processes each started their own TensorFlow, ~6 s of a core, which cost more than they
gained on inputs of a few thousand images.) Progress, with an ETA, is logged after each shard;
an interrupted preparation resumes with the same command, redoing only the shards not yet
recorded in OUTPUT/.progress/. Images that cannot be decoded are skipped, counted and listed in
the index. ImageNet's oddities decode as images: CMYK and greyscale JPEGs (TensorFlow's decoder
converts them to RGB) and PNG files named .JPEG (the decoder follows the content, not the name).
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import dataclasses
import datetime
import io
import json
import os
import time
from typing import Any

from absl import logging
import numpy as np

from alexnet_jax import cli
from alexnet_jax import config as config_lib
from alexnet_jax import cpu
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
WRITE_BATCH = 16  # images handed to the shards' writer at a time


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
      n = sources.tfds_num_examples(builder, split)
    except (KeyError, ValueError) as e:
      raise DataError(f'{settings.source} has no split {split!r} ({errors.one_line(e)}); its splits '
                      f'are {sorted(builder.info.splits)}') from None
    ranges = [(a, min(a + settings.shard_size, n)) for a in range(0, n, settings.shard_size)]
    shards.extend(Shard(split, i, len(ranges), r) for i, r in enumerate(ranges))
  return classes, shards


# ---------------------------------------------------------------------------- the work


def _square_encoder(settings: Settings):
  """encoded image -> {'square': uint8 [R, R, 3], 'jpeg': its JPEG bytes, 'outer': the sum of
  x x^T over its pixels (float64 [3, 3], for the statistics)}: TensorFlow ops only, so that
  tf.data runs it on parallel threads."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def encode(encoded):
    square = augment.to_uint8(sources.decode_center_square(encoded, settings.resize_size,
                                                           settings.antialias))
    rgb = tf.reshape(tf.cast(square, tf.float64), [-1, 3])
    return {'square': square, 'jpeg': tf.io.encode_jpeg(square, quality=settings.quality),
            'outer': tf.matmul(rgb, rgb, transpose_a=True)}

  return encode


def _folder_examples(shards: list[Shard]):
  """(shard position, item in the shard, file path, label) of every item of `shards`, in
  order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rows = [(pos, item, path, label) for pos, shard in enumerate(shards)
          for item, (path, label) in enumerate(shard.items)]
  return tf.data.Dataset.from_tensor_slices(tuple(
      tf.constant([row[i] for row in rows], dtype)
      for i, dtype in enumerate((tf.int64, tf.int64, tf.string, tf.int64))))


def _tfds_examples(settings: Settings, shards: list[Shard]):
  """The same for TFDS record ranges, with the encoded image in place of the path: each split
  read once, from its first shard to do to its last."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = sources.tfds_builder(_source_config(settings))
  starts = np.array([s.items[0] for s in shards], np.int64)
  out = None
  for split in dict.fromkeys(s.split for s in shards):  # in order, once each
    mine = [(pos, s) for pos, s in enumerate(shards) if s.split == split]
    first, last = mine[0][1].items[0], mine[-1][1].items[1]
    # Record k of the split belongs to shard position wanted[k - first] (-1: already done).
    wanted = np.full(last - first, -1, np.int64)
    for pos, s in mine:
      wanted[s.items[0] - first:s.items[1] - first] = pos
    ds = builder.as_dataset(split=f'{split}[{first}:{last}]', shuffle_files=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
    ds = ds.enumerate(first).map(lambda k, ex: (tf.gather(wanted, k - first), k, ex['image'],
                                                ex['label']))
    ds = ds.filter(lambda p, k, e, l: p >= 0).map(
        lambda p, k, e, l: (p, k - tf.gather(starts, p), e, tf.cast(l, tf.int64)))
    out = ds if out is None else out.concatenate(ds)
  return out


def why_unreadable(settings: Settings, shard: Shard, item: int) -> tuple[str, str]:
  """(where, why) of an item the parallel stage left out, read and decoded once more, eagerly:
  its path ('folder') or its TFDS file name, and the reason."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if settings.source == 'folder':
    where = shard.items[item][0]
    load = lambda: tf.io.read_file(where)
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    k = shard.items[0] + item
    builder = sources.tfds_builder(_source_config(settings))
    ex = next(iter(builder.as_dataset(split=f'{shard.split}[{k}:{k + 1}]', shuffle_files=False,
                                      decoders={'image': tfds.decode.SkipDecoding()})))
    name = ex['file_name'].numpy().decode() if 'file_name' in ex else ''
    where = name or f'{settings.source}[{shard.split}][{k}]'
    load = lambda: ex['image']
  try:
    _square_encoder(settings)(load())
  except (tf.errors.OpError, ValueError) as e:
    return where, sources.unreadable_reason(e)
  return where, 'unreadable once, readable on a second try'


class _ShardWriter:
  """Writes the shards in order as their examples arrive: each to a temporary file renamed into
  place when whole, then handed to `done(shard, result)`."""

  def __init__(self, settings: Settings, shards: list[Shard], output: str, done):
    self.settings, self.shards, self.output, self.done = settings, shards, output, done
    self.pos, self.writer = -1, None

  def _open(self, pos: int) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.pos, shard = pos, self.shards[pos]
    self.path = paths.resolve(self.output) / shard.filename
    self.writer = tf.io.TFRecordWriter(str(self.path) + '.tmp')
    self.seen: set[int] = set()
    self.sums = (data_stats.StatsSums(self.settings.resize_size)
                 if shard.split == self.settings.train_split else None)

  def _close(self) -> None:
    shard = self.shards[self.pos]
    self.writer.close()
    os.replace(str(self.path) + '.tmp', self.path)
    unreadable = [why_unreadable(self.settings, shard, i) for i in range(_size(shard))
                  if i not in self.seen]
    self.done(shard, {'num_examples': len(self.seen), 'bytes': os.path.getsize(self.path),
                      'unreadable': unreadable,
                      'sums': self.sums.arrays() if self.sums is not None else None})

  def advance(self, pos: int) -> None:
    """Finishes every shard before `pos` (empty ones too) and opens `pos` (if there is one)."""
    while self.pos < pos:
      if self.writer is not None:
        self._close()
        self.writer = None
      if self.pos + 1 == len(self.shards):
        return
      self._open(self.pos + 1)

  def write(self, pos: int, items: np.ndarray, labels: np.ndarray,
            examples: dict[str, np.ndarray]) -> None:
    """Writes examples of shard `pos` (`items`: their places in it), in order."""
    self.advance(pos)
    for jpeg, label in zip(examples['jpeg'], labels):
      self.writer.write(sources.prepared_record(jpeg, int(label)))
    if self.sums is not None:
      self.sums.add_squares(examples['square'], examples['outer'])
    self.seen.update(items.tolist())

  def finish(self) -> None:
    self.advance(len(self.shards))  # closes the last one (opening none past the end)


def prepare_shards(settings: Settings, shards: list[Shard], output: str, parallel: int,
                   done) -> None:
  """Writes `shards` into `output` in order, decoding and encoding the images on `parallel` of
  tf.data's threads (one TensorFlow runtime, no worker processes to start); calls
  done(shard, result) after each, result = {'num_examples', 'bytes', 'unreadable': [(where,
  why)], 'sums': the shard's StatsSums arrays or None}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not shards:
    return
  encode = _square_encoder(settings)
  if settings.source == 'folder':
    examples, load = _folder_examples(shards), tf.io.read_file
  else:
    examples, load = _tfds_examples(settings, shards), tf.identity
  options = tf.data.Options()
  options.deterministic = True  # the shards' bytes do not depend on `parallel`.
  # `parallel` threads for the images, each op on one of them, no autotuning of buffers. (One
  # thread still keeps about 1.2 cores busy: the writer on this thread, and TensorFlow's own
  # threads beside the pool; 2 threads run at 0.96 of two share-nothing processes on 2 cores,
  # BENCHMARKS.md.) Two images in flight per thread: a slow image does not leave a thread idle
  # while the order waits for it.
  options.threading.max_intra_op_parallelism = 1
  options.threading.private_threadpool_size = parallel
  options.autotune.enabled = False
  # A file that cannot be read or decoded fails its element, which ignore_errors leaves out;
  # the shard's writer finds it missing and asks why (`why_unreadable`).
  ds = examples.map(lambda p, i, e, l: (p, i, l, encode(load(e))),
                    num_parallel_calls=2 * parallel)
  # Batches: one Python step per WRITE_BATCH images (per image, the iterator's own cost was
  # ~0.7 ms of the main thread, a fifth of an image's decode and encode on a core).
  ds = ds.ignore_errors().batch(WRITE_BATCH).prefetch(1).with_options(options)
  writer = _ShardWriter(settings, shards, output, done)
  for pos, items, labels, encoded in ds.as_numpy_iterator():
    # A batch may end one shard and start the next: written run by run.
    bounds = [0, *(np.flatnonzero(np.diff(pos)) + 1), len(pos)]
    for a, b in zip(bounds[:-1], bounds[1:]):
      writer.write(int(pos[a]), items[a:b], labels[a:b],
                   {k: v[a:b] for k, v in encoded.items()})
  writer.finish()


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
  """Prepares every split of `settings` into `output` (resuming what is there) on `workers`
  threads (default: one per core this process may use); returns the index it writes to
  output/index.json."""
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
  if workers is None:
    workers = cpu.usable_cores()
  logging.info('Preparing %d images of %s (%s) into %s: %d shards, %d to do, on %d '
               'threads.',
               total_images, settings.source, ', '.join(settings.splits), output, len(shards),
               len(todo), workers)
  done_images, t0 = 0, time.time()

  def finished(shard, result):
    nonlocal done_images
    progress.record(shard.key, result)
    done_images += _size(shard)
    rate = done_images / max(time.time() - t0, 1e-9)
    logging.info('%d/%d shards (%s), %d/%d images, %.0f images/s, ETA %s', len(progress.done),
                 len(shards), shard.filename, total_images - todo_images + done_images,
                 total_images, rate, format_duration((todo_images - done_images) / rate))

  prepare_shards(settings, todo, output, workers, finished)
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
  flags.DEFINE_integer('workers', None, 'Threads that decode and encode the images, in this one '
                       'process (default: one per core this process may use).')


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
      sources.split_dir(_source_config(settings), split)
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
