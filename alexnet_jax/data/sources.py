"""Where examples come from: a TFDS dataset, a folder of images, scikit-learn's digits, synthetic.

Every source ends in the same thing, §2's "square" image: the short side rescaled to
`config.resize_size` and the central resize_size x resize_size patch kept, float32 RGB on a
0..255 scale. `alexnet_jax.data.pipeline` does the rest (mean, crops, flips, lighting, batching).

Each source answers the same questions, through one interface (`_Split`: its size, where it
lives, this process's training examples of a `TrainOrder`, its slice for evaluation, a sample
for statistics and figures, its unreadable files), chosen once by config.dataset (`_SOURCES`):
- `IndexedSplit`: examples readable in any order by index (folder, digits, a TFDS split held in
  memory when config.cache is set). Training draws an exact per-epoch permutation.
- `StreamSplit`: a TFDS split read from its files in a fixed order (ImageNet); training shuffles
  it with a seeded shuffle buffer.
- `ShardedSplit`: a split prepared once into 256x256 JPEG shards (`alexnet_jax.data.prepare`,
  dataset='prepared'): read by example ranges of its files, whose counts the index holds.
- `SyntheticSplit`: random images made whole (dataset='synthetic'), for speed checks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import paths
from alexnet_jax.data import augment
from alexnet_jax.errors import DataError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')  # 'folder' source, compared case-insensitively.
IMAGENET_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
# §2: ILSVRC-2012's split sizes; 'synthetic' data pretends to be this big so that steps per epoch
# (and so learning-rate schedules) match the paper run.
SYNTHETIC_NUM_TRAIN = 1_281_167
SYNTHETIC_NUM_EVAL = 50_000
# scikit-learn digits: pixel values 0..16; a fixed stratified split of the 1,797 images, the one
# sklearn.model_selection.train_test_split draws with the settings that the file records.
DIGITS_MAX_VALUE = 16.0
DIGITS_SPLIT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits_split.json')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about the dataset before reading it."""
  num_classes: int
  num_train: int  # examples (for 'folder': image files) in config.train_split
  num_eval: int  # examples in config.eval_split
  class_names: tuple[str, ...]


# Tries per training position for sources with unreadable files: the image at the position and
# then the following ones in the epoch's order. Eight unreadable images in a row of a shuffled
# order means the folder is mostly broken; that position is then dropped (and the batch filled
# from the next positions, which shifts that epoch's remaining batches).
FALLBACK_CANDIDATES = 8
_FOREVER = 2**62  # epochs
# A training example (its decoded square in 'image') -> what the pipeline batches.
Finish = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class TrainOrder:
  """Where this process's training examples sit in the global batch order, and where a resumed
  run starts in it: the one statement of both, for every kind of split.

  `position` is the index in the epoch of the global batch order: global step k holds positions
  [k * B, (k + 1) * B), and process p takes [k * B + p * b, k * B + (p + 1) * b). Each split
  maps an (epoch, position) to one of its examples in its own way (`Split.train_examples`).
  """
  global_batch: int  # B
  per_process: int  # b
  process: int  # p
  num_processes: int
  steps: int  # steps per epoch
  start_step: int
  seed: int
  shuffle_buffer: int  # for splits read in a fixed order (shuffle buffer, prepared windows)
  # Draws [..., augment.NUM_DRAWS] -> what the augmentation chose for each example
  # (`augment.TrainAugment.choices`: {'crop', 'lighting'}), which each example carries.
  choose: Callable[[tf.Tensor], dict[str, tf.Tensor]]

  @property
  def start_epoch(self) -> int:
    return self.start_step // self.steps

  @property
  def share(self) -> int:
    """This process's examples per epoch."""
    return self.steps * self.per_process

  def position(self, local):
    """Index in this process's share of the epoch -> position in the global order."""
    b = self.per_process
    return (local // b) * self.global_batch + self.process * b + local % b

  def first_local(self, epoch):
    """The first local index to read in `epoch`: the resume step's, in the first epoch only."""
    return tf.where(epoch == self.start_epoch,
                    np.int64(self.start_step % self.steps * self.per_process), np.int64(0))

  def epochs(self, epoch_examples: Callable[[tf.Tensor], tf.data.Dataset]) -> tf.data.Dataset:
    """The examples of every epoch from the resume step's on."""
    return tf.data.Dataset.range(self.start_epoch, _FOREVER).flat_map(epoch_examples)

  def epoch_seed(self, epoch) -> tf.Tensor:
    return tf.stack([tf.constant(self.seed, tf.int64), epoch])

  def choices(self, epoch, positions) -> dict[str, tf.Tensor]:
    """The augmentation's choices for the examples at these positions (int64, any shape):
    `choose` of their draws (`augment.position_draws`), a function of (seed, epoch, position)."""
    draws = augment.position_draws(self.epoch_seed(epoch), positions)
    return self.choose(draws)


class _Split:
  """What every split answers, whatever it reads (the pipeline, the statistics and the figures
  ask only these):

  - `num_examples`, `location`;
  - `train_examples(order, finish)`: this process's training examples of every epoch from the
    resume step on, each {'image' (the square), 'label'} with what the augmentation chose for
    its (epoch, position) (`TrainOrder.choices`: 'crop', 'lighting'), and 'candidates',
    'attempt' where images can be unreadable, handed to `finish` in the same parallel stage that
    decodes it (one stage per image: each tf.data stage costs ~20 us per element on a core);
    the same for a given (seed, epoch, position) in any run;
  - `eval_examples(process, count)`: this process's slice of the split, (square, label, index),
    each example in exactly one process, and the indices it was given (for the log of the
    unreadable ones) or None;
  - `sample(n, spread)`: n examples for statistics and figures, {'square', 'label', 'index'},
    with how they were chosen;
  - `unreadable(index)` and `may_fail`: which images could not be read, and why;
  - `fixed_batches(...)`: batches that need no reading at all (synthetic data), else None.
  """

  def check_usable(self) -> None:
    """DataError when not one image of the split can be read (nothing to check by default)."""

  def unreadable(self, index: int) -> str:
    raise NotImplementedError(f'{type(self).__name__} has no unreadable images')

  def fixed_batches(self, config, batch: int, image_shape: list[int] | None = None,
                    num_batches: int = 0):
    """Ready batches (training when image_shape is None, else evaluation), or None: read."""
    del config, batch, image_shape, num_batches
    return None


@dataclasses.dataclass(frozen=True)
class IndexedSplit(_Split):
  """A split whose examples can be read in any order by index (folder, digits, a TFDS split held
  in memory when config.cache is set). Training draws an exact per-epoch permutation."""
  labels: np.ndarray  # int32 [n]
  load: Callable[[tf.Tensor], tf.Tensor]  # int64 index -> square float32 image; may raise
  describe: Callable[[int], str]  # index -> where the example lives, for log messages
  may_fail: bool  # whether `load` can raise for some indices (unreadable files)
  location: str  # where the split lives, for error messages

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  def unreadable(self, index: int) -> str:
    """'<where>: <why>' of an example whose `load` failed inside tf.data.

    tf.data's ignore_errors drops the error, so the example is loaded once more, eagerly, to get
    it: unreadable files are few, and this runs only for them.
    """
    where = self.describe(index)
    try:
      self.load(tf.constant(index, tf.int64))
    except (tf.errors.OpError, ValueError) as e:
      reason = unreadable_reason(e)
      # File errors start with the path itself ('/a/b.jpg; Permission denied').
      return f'{where}: {reason.removeprefix(f"{where}; ")}'
    return f'{where}: unreadable once, readable on a second try'

  def check_usable(self) -> None:
    if not self.may_fail:
      return
    probe = tf.data.Dataset.range(self.num_examples).map(self.load).ignore_errors().take(1)
    if not list(probe):
      raise DataError(f'None of the {self.num_examples} images in {self.location} can be '
                      f'decoded (the first: {self.unreadable(0)}): the folder has no usable '
                      'images.')

  def train_examples(self, order: TrainOrder, finish: Finish) -> tf.data.Dataset:
    n, tries = self.num_examples, FALLBACK_CANDIDATES if self.may_fail else 1
    labels = tf.constant(self.labels)

    def load(index, attempt):
      return {'image': self.load(index), 'label': tf.gather(labels, index), 'attempt': attempt}

    def epoch_examples(epoch):
      permutation = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                             seed=order.epoch_seed(epoch))

      def candidates(local):  # the example at the position, then the following ones
        pos = order.position(local)
        following = (pos + tf.range(tries, dtype=tf.int64)) % n
        return {**order.choices(epoch, pos), 'candidates': tf.gather(permutation, following)}

      return tf.data.Dataset.range(order.first_local(epoch), order.share).map(candidates)

    def first(el):
      return finish({**el, **load(el.pop('candidates')[0], 0)})

    def first_readable(el):
      candidates = el['candidates']
      tries_ = tf.data.Dataset.from_tensor_slices((candidates, tf.range(tf.size(candidates))))
      # Lazily, in order: the next candidate is decoded only if the previous one raised.
      tries_ = tries_.map(load).ignore_errors().take(1)
      return tries_.map(lambda ex: finish({**el, **ex}))

    ds = order.epochs(epoch_examples)
    if self.may_fail:
      # Parallel over positions; with one output per position the deterministic interleave
      # keeps the positions' order. In a short run on 2 cores it was within noise of the plain
      # map (no spare candidates are decoded ahead: see pipeline's options).
      return ds.interleave(first_readable, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True)
    return ds.map(first, num_parallel_calls=tf.data.AUTOTUNE)

  def eval_examples(self, process: int, count: int):
    labels = tf.constant(self.labels)
    assigned = np.arange(process, self.num_examples, count)
    ds = tf.data.Dataset.from_tensor_slices(assigned).map(
        lambda i: (self.load(i), tf.gather(labels, i), i), num_parallel_calls=tf.data.AUTOTUNE)
    return (ds.ignore_errors() if self.may_fail else ds), assigned

  def sample(self, n: int, spread: Callable[[int, int], np.ndarray]):
    """The examples at the indices `spread(num_examples, n)` (the caller's choice)."""
    indices = np.asarray(spread(self.num_examples, n), np.int64)
    labels = tf.constant(self.labels)
    ds = tf.data.Dataset.from_tensor_slices(indices).map(
        lambda i: {'square': self.load(i), 'label': tf.gather(labels, i), 'index': i},
        num_parallel_calls=tf.data.AUTOTUNE)
    return (ds.ignore_errors() if self.may_fail else ds), indices


@dataclasses.dataclass(frozen=True)
class StreamSplit(_Split):
  """A TFDS split read from its files in a fixed order (ImageNet): {'image': encoded bytes,
  'label'} records; training shuffles it with a seeded shuffle buffer."""
  may_fail = False  # (not a field) nothing here is unreadable after its check
  num_examples: int
  # (process_index, process_count) -> that process's share, always in the same order.
  process_records: Callable[[int, int], tf.data.Dataset]
  decode: Callable[[tf.Tensor], tf.Tensor]  # encoded bytes -> square float32 image
  location: str = 'a TFDS split'

  def train_examples(self, order: TrainOrder, finish: Finish) -> tf.data.Dataset:
    records = self.process_records(order.process, order.num_processes)

    def epoch_examples(epoch):
      shuffle_seed = tf.random.stateless_uniform([], order.epoch_seed(epoch), minval=None,
                                                 maxval=None, dtype=tf.int64)
      ds = records.shuffle(order.shuffle_buffer, seed=shuffle_seed).take(order.share)

      def with_position(local, ex):
        return {**order.choices(epoch, order.position(local)), 'encoded': ex['image'],
                'label': ex['label']}

      return ds.enumerate().skip(order.first_local(epoch)).map(with_position)

    return _decoded(order.epochs(epoch_examples), self.decode, finish)

  def eval_examples(self, process: int, count: int):
    return self.process_records(process, count).enumerate().map(
        lambda i, ex: (self.decode(ex['image']), ex['label'], i),
        num_parallel_calls=tf.data.AUTOTUNE), None

  def sample(self, n: int, spread: Callable[[int, int], np.ndarray]):
    """The first n records in the stored order: TFDS wrote them shuffled, a random sample."""
    del spread
    n = min(n, self.num_examples)
    return self.process_records(0, 1).take(n).enumerate().map(
        lambda i, ex: {'square': self.decode(ex['image']), 'label': ex['label'], 'index': i},
        num_parallel_calls=tf.data.AUTOTUNE), None


@dataclasses.dataclass(frozen=True)
class SyntheticSplit(_Split):
  """Random images and labels, nothing to decode: for benchmarks of the training loop."""
  may_fail = False  # (not a field) nothing here is unreadable after its check
  num_examples: int
  num_classes: int
  location: str = "dataset='synthetic'"

  def fixed_batches(self, config, batch: int, image_shape: list[int] | None = None,
                    num_batches: int = 0):
    import jax  # pylint: disable=g-import-not-at-top  (the process's place in the run)
    if image_shape is None:  # one random batch, repeated: zero-mean values of the scale of
      # mean-subtracted pixels.
      key = tf.constant([config.seed, jax.process_index()], tf.int64)
      size = config.image_size
      half = augment.PIXEL_MAX / 2
      fixed = {'image': tf.random.stateless_uniform([batch, size, size, 3], key, -half,
                                                    half).numpy(),
               'label': tf.random.stateless_uniform([batch], key, 0, config.num_classes,
                                                    dtype=tf.int32).numpy()}
      return _repeat(fixed)
    return self._eval_batches(batch, image_shape, num_batches)

  def _eval_batches(self, batch, image_shape, num_batches):
    import jax  # pylint: disable=g-import-not-at-top
    images = np.zeros([batch] + image_shape, np.float32)
    positions = jax.process_index() + jax.process_count() * np.arange(num_batches * batch)
    for k in range(num_batches):
      mask = positions[k * batch:(k + 1) * batch] < self.num_examples
      yield {'image': images, 'label': np.zeros([batch], np.int32), 'mask': mask}

  def train_examples(self, order: TrainOrder, finish: Finish) -> tf.data.Dataset:
    raise DataError("dataset='synthetic' has no images to read: its batches are made whole.")

  def eval_examples(self, process: int, count: int):
    raise DataError("dataset='synthetic' has no images to read: its batches are made whole.")

  def sample(self, n: int, spread: Callable[[int, int], np.ndarray]):
    raise DataError("dataset='synthetic' has no images: no statistics and nothing to show "
                    '(use config.mean=None).')


@dataclasses.dataclass(frozen=True)
class ShardedSplit(_Split):
  """A prepared split: TFRecord files of square JPEGs, with the number of examples of each."""
  may_fail = False  # (not a field) nothing here is unreadable after its check
  files: tuple[str, ...]
  counts: tuple[int, ...]
  location: str
  side: int  # every prepared square is side x side

  @property
  def num_examples(self) -> int:
    return sum(self.counts)

  def range_records(self, start: int, stop: int) -> tf.data.Dataset:
    """{'encoded', 'label'} of examples [start, stop) of the files in their stored order."""
    ends = np.cumsum(self.counts)
    segments = [(f, max(start - (end - n), 0), min(stop, end) - max(start, end - n))
                for f, n, end in zip(self.files, self.counts, ends)]
    segments = [s for s in segments if s[2] > 0]
    return read_segments(tf.constant([s[0] for s in segments], tf.string),
                         tf.constant([s[1] for s in segments], tf.int64),
                         tf.constant([s[2] for s in segments], tf.int64)).map(parse_prepared)

  def decode(self, encoded: tf.Tensor) -> tf.Tensor:
    """A record's JPEG -> its uint8 square [side, side, 3], decoded whole. Decoding only the
    patch's window (`decode_and_crop_jpeg`) changes the pixels at its edges by up to 4 levels
    (libjpeg's chroma upsampling at the window's border) and was no faster here (docs/data.md).
    """
    return tf.ensure_shape(tf.io.decode_jpeg(encoded, channels=3), [self.side, self.side, 3])

  def train_examples(self, order: TrainOrder, finish: Finish) -> tf.data.Dataset:
    """Each epoch shuffles the files, then reads this process's contiguous slice of their
    examples in windows of order.shuffle_buffer, each read whole and permuted (the next window,
    of this epoch or the next, read while this one is consumed)."""
    p, share = order.process, order.share
    window = min(order.shuffle_buffer, share)
    num_windows = -(-share // window)
    files = tf.constant(self.files, tf.string)
    counts = tf.constant(self.counts, tf.int64)

    def epoch_windows(epoch):
      permutation = tf.random.experimental.stateless_shuffle(
          tf.range(len(self.files), dtype=tf.int64), seed=order.epoch_seed(epoch))
      ordered_counts = tf.gather(counts, permutation)
      ends = tf.cumsum(ordered_counts)
      starts = ends - ordered_counts
      first_local = order.first_local(epoch)

      def load_window(w):  # window w of this process's slice, read whole and permuted
        lo = p * share + w * window
        hi = tf.minimum(lo + window, (p + 1) * share)
        takes = tf.maximum(tf.minimum(hi, ends) - tf.maximum(lo, starts), 0)
        used = takes > 0
        records = read_segments(
            tf.boolean_mask(tf.gather(files, permutation), used),
            tf.boolean_mask(tf.maximum(lo - starts, 0), used), tf.boolean_mask(takes, used))
        ex = parse_prepared(records.batch(hi - lo).get_single_element())
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(hi - lo), seed=tf.random.experimental.stateless_fold_in(
                order.epoch_seed(epoch), lo))
        # A resumed run starts inside its first window: the examples before it are dropped
        # before anything is decoded.
        start = tf.maximum(first_local - w * window, 0)
        perm = perm[start:]
        positions = order.position(w * window + start + tf.range(hi - lo - start))
        return {'encoded': tf.gather(ex['encoded'], perm), 'label': tf.gather(ex['label'], perm),
                **order.choices(epoch, positions)}

      return tf.data.Dataset.range(first_local // window, num_windows).map(load_window)

    examples = order.epochs(epoch_windows).prefetch(1).unbatch()
    return _decoded(examples, self.decode, finish)

  def eval_examples(self, process: int, count: int):
    """Contiguous slices, their sizes within one."""
    n = self.num_examples
    lo, hi = process * n // count, (process + 1) * n // count
    return self.range_records(lo, hi).enumerate(lo).map(
        lambda i, ex: (self.decode(ex['encoded']), ex['label'], i),
        num_parallel_calls=tf.data.AUTOTUNE), None

  def sample(self, n: int, spread: Callable[[int, int], np.ndarray]):
    """The first n examples in the stored order."""
    del spread
    n = min(n, self.num_examples)
    return self.range_records(0, n).enumerate().map(
        lambda i, ex: {'square': self.decode(ex['encoded']), 'label': ex['label'], 'index': i},
        num_parallel_calls=tf.data.AUTOTUNE), None


def _decoded(ds: tf.data.Dataset, decode: Callable[[tf.Tensor], tf.Tensor],
             finish: Finish) -> tf.data.Dataset:
  """Training examples with their encoded bytes decoded into the square 'image', finished in
  the same stage."""
  def decoded(el):
    out = {k: v for k, v in el.items() if k != 'encoded'}
    return finish({**out, 'image': decode(el['encoded'])})

  return ds.map(decoded, num_parallel_calls=tf.data.AUTOTUNE)


def _repeat(batch):
  while True:
    yield batch


Split = IndexedSplit | StreamSplit | SyntheticSplit | ShardedSplit


def unreadable_reason(error: Exception) -> str:
  """Why an image could not be read, in a line: TensorFlow's message without its node trace."""
  lines = [line.strip() for line in (getattr(error, 'message', None) or str(error)).splitlines()]
  lines = [line for line in lines if line and not line.startswith('[[')] or ['']
  text = re.sub(r'^\{\{[^}]*\}\}\s*', '', lines[-1])
  # Eager errors end in '[Op:DecodeImage] name: ', those of a tf.function in '[Op:...]'.
  return re.sub(r'\s*\[Op:[^]]*\](\s*name:.*)?$', '', text)[:200] or type(error).__name__


def decode_center_square(encoded: tf.Tensor, resize_size: int,
                         antialias: bool = True) -> tf.Tensor:
  """§2: decode, keep the central square (side = short side), resize it to resize_size.

  Keeping the central min(H, W) square and then resizing equals rescaling the short side to
  resize_size and cropping the central patch, up to sub-pixel rounding of the window. For JPEGs
  only that window is decoded (`decode_and_crop_jpeg`, with the window computed from the header),
  which skips the discarded quarter of a 4:3 image. Bilinear resizing with antialiasing, because
  most ImageNet images shrink (500x375 -> 256) and some by large factors, where plain bilinear
  sampling aliases (Krizhevsky's own preprocessing resized with a filtering resampler too).
  Antialiasing about doubles the decode-and-resize time per image (3.5 against 1.6 ms for a
  500x375 JPEG on one core, measured); antialias=False trades that aliasing for speed. For
  500x375 photographs the fused crop saved little in the same measurement: entropy decoding,
  which cannot skip columns, dominates. Any other format (PNG, GIF, BMP; grey or RGBA) goes
  through `decode_image`.

  The content decides, not the file name (a PNG named .JPEG is a PNG). Greyscale becomes three
  equal channels; CMYK JPEGs become RGB as Pillow's convert('RGB') makes them (within a level);
  an alpha channel is dropped, not composited (as Pillow's convert('RGB') does); 16-bit PNG
  samples become their high byte, v >> 8 (within one level of round(v * 255 / 65535)).
  JPEGs go through libjpeg's fast integer IDCT (TensorFlow's default), which differs from the
  accurate one Pillow uses by up to a few levels on textured images. A truncated or empty file,
  or one that is no image, raises `tf.errors.InvalidArgumentError`.

  Returns:
    float32 [resize_size, resize_size, 3] on a 0..255 scale.
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    top, left, side = _square_window(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, side, side]), channels=3)

  def other():
    return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)

  # A JPEG comes out of its decoder square already; center_square then only resizes it.
  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  return center_square(tf.ensure_shape(image, [None, None, 3]), resize_size, antialias)


def _square_window(height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """(top, left, side) of the central square of a height x width image."""
  side = tf.minimum(height, width)
  return (height - side) // 2, (width - side) // 2, side


def center_square(image: tf.Tensor, resize_size: int, antialias: bool = True) -> tf.Tensor:
  """§2's square of a decoded image: its central min(H, W) square resized to resize_size.

  `image`: uint8 [H, W, 3], or a batch [N, H, W, 3] of one size. The second half of
  `decode_center_square` (see there for the choice of resizing), for images decoded elsewhere:
  the exported serving function (`alexnet_jax.weights.export`) starts from it.

  Returns:
    float32 [resize_size, resize_size, 3] (or [N, ...]) on a 0..255 scale.
  """
  shape = tf.shape(image)
  top, left, side = _square_window(shape[-3], shape[-2])
  square = image[..., top:top + side, left:left + side, :]
  return tf.image.resize(square, [resize_size, resize_size], method='bilinear',
                         antialias=antialias)


def _decoder(config) -> Callable[[tf.Tensor], tf.Tensor]:
  """decode_center_square with the config's resize_size (and antialias choice)."""
  return functools.partial(decode_center_square, resize_size=config.resize_size,
                           antialias=config.resize_antialias)


# ---------------------------------------------------------------------------- TFDS datasets


def _data_dir(config) -> str | None:
  return str(paths.resolve(config.data_dir)) if config.data_dir else None


def _check_imagenet_manual_files(builder, config) -> None:
  """Raises `DataError` naming the ImageNet tar files and where TFDS expects them."""
  root = _data_dir(config) or str(paths.resolve(
      os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')))
  manual_dir = paths.resolve(root) / 'downloads' / 'manual'
  missing = [f for f in IMAGENET_MANUAL_FILES if not (manual_dir / f).exists()]
  if missing:
    raise DataError(
        f'{builder.name} is not prepared in {root} and the manual-download files '
        f'{", ".join(missing)} are missing from {manual_dir}/. ImageNet cannot be downloaded '
        f'automatically: register at https://image-net.org/download-images, download '
        f'{" and ".join(IMAGENET_MANUAL_FILES)}, put them in <data_dir>/downloads/manual/ and '
        f'pass --config.data_dir=<data_dir> (now {config.data_dir!r}). Or point '
        f'--config.dataset=folder --config.data_dir=ROOT at JPEGs in ROOT/<split>/<class>/.')


def tfds_builder(config):
  """The prepared TFDS builder for config.dataset (prepares it if it can be downloaded).

  In a run of several processes only process 0 prepares the dataset (one writer of the files);
  the others wait for it at a barrier, then open what it wrote.
  """
  builder = tfds.builder(config.dataset, data_dir=_data_dir(config))
  if builder.is_prepared():
    return builder
  if builder.name == 'imagenet2012':
    _check_imagenet_manual_files(builder, config)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    logging.warning('Preparing %s in %s (once; for imagenet2012 from its tar files, hours).',
                    builder.name, builder.data_dir)
    builder.download_and_prepare()
  if jax.process_count() > 1:
    from alexnet_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.barrier(f'alexnet_jax: {builder.name} prepared', timeout_s=7 * 24 * 3600)
    builder = tfds.builder(config.dataset, data_dir=_data_dir(config))
  return builder


def tfds_num_examples(builder, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except KeyError:  # split sizes unknown (e.g. tfds.testing.mock_data): count the records.
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    count = int(ds.cardinality())
    return count if count >= 0 else int(ds.reduce(0, lambda n, _: n + 1))


def _tfds_records(builder, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's share of a TFDS split, encoded, in the same order on every call."""
  if process_count > 1:  # contiguous, near-equal slices (sizes differ by at most one)
    split = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count)
  # Files in their stored order: the order must not change between calls (exact resume);
  # TFDS shuffled the examples once when it wrote them, and the trainer shuffles on top.
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)})


@functools.lru_cache(maxsize=4)
def _tfds_in_memory(name: str, data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All encoded images and labels of a (small) TFDS split, for config.cache."""
  builder = tfds.builder(name, data_dir=data_dir)
  images, labels = [], []
  for ex in _tfds_records(builder, split, 0, 1).batch(1024).as_numpy_iterator():
    images.extend(ex['image'])
    labels.append(ex['label'])
  logging.info('Holding %d encoded images of %s[%s] in memory (config.cache).', len(images),
               name, split)
  return np.array(images, dtype=object), np.concatenate(labels).astype(np.int32)


# ---------------------------------------------------------------------------- image folders


def split_dir(config, split: str) -> str:
  path = str(paths.resolve(_data_dir(config) or '.') / split)
  if not config.data_dir or not paths.resolve(path).is_dir():
    raise DataError(f"dataset='folder' expects images in <data_dir>/{split}/<class>/*.jpg; "
                    f'{path!r} is not a directory (--config.data_dir={config.data_dir!r}).')
  return path


@functools.lru_cache(maxsize=8)
def list_folder(folder: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
  """(class folder names, sorted (path, class name) pairs) of one split folder.

  A class folder without images stays a class, so that labels mean the same in every split and
  every run; it is named in one warning (per split folder: the listing is cached).
  """
  classes = tuple(sorted(p.name for p in paths.resolve(folder).iterdir() if p.is_dir()))
  files = []
  for name in classes:
    for root, _, filenames in (paths.resolve(folder) / name).walk():
      files.extend((str(root / f), name) for f in filenames
                   if f.lower().endswith(IMAGE_EXTENSIONS))
  files.sort()
  if not files:
    raise DataError(f'No images ({"/".join(IMAGE_EXTENSIONS)}) in {folder}/<class>/: '
                    f'the folder has no usable images.')
  empty = sorted(set(classes) - {c for _, c in files})
  if empty:
    logging.warning('Class folders of %s with no %s images: %s. They stay classes (the labels '
                    'of the others do not shift), with no examples in this split.', folder,
                    '/'.join(IMAGE_EXTENSIONS), ', '.join(empty))
  return classes, tuple(files)


def folder_class_names(config) -> tuple[str, ...]:
  """Class names of the 'folder' source: the sorted folder names of the train split."""
  return list_folder(split_dir(config, config.train_split))[0]


def _folder_split(config, split: str) -> IndexedSplit:
  classes = folder_class_names(config)
  _, files = list_folder(split_dir(config, split))
  class_index = {name: i for i, name in enumerate(classes)}
  unknown = sorted({c for _, c in files if c not in class_index})
  if unknown:
    raise DataError(f'Classes {unknown[:5]} of split {split!r} are not folders of the train '
                    f'split {config.train_split!r} in {config.data_dir}.')
  paths = tf.constant([p for p, _ in files])
  decode = _decoder(config)

  def load(index):
    return decode(tf.io.read_file(tf.gather(paths, index)))

  return IndexedSplit(labels=np.array([class_index[c] for _, c in files], np.int32), load=load,
                      describe=lambda i: files[i][0], may_fail=True,
                      location=split_dir(config, split))


# ---------------------------------------------------------------------------- digits


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 digits as its `load_digits` gives them: (float64 [1797, 8, 8], values
  0..16; int64 [1797] labels).

  Read from the CSV file inside the installed scikit-learn package, found without importing it
  (the import takes ~0.6 s of a command's start on 2 cores); through `load_digits` itself where
  that file is not where scikit-learn keeps it today.
  """
  spec = importlib.util.find_spec('sklearn')
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, 'datasets', 'data', 'digits.csv.gz')
    if os.path.isfile(path):
      data = np.loadtxt(path, delimiter=',')  # 64 pixel values, then the label, per row
      return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  return digits.images, digits.target


@functools.lru_cache(maxsize=4)
def digits_arrays(resize_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's 1,797 digits as {'train', 'test'}: (uint8 [n, R, R, 3], int32 [n]).

  A fixed stratified split (1,437 / 360; indices in DIGITS_SPLIT_FILE, in the order each split
  is read). Values 0..16 are scaled to 0..255 and the grey replicated to RGB; the 8x8 images are
  upscaled with nearest-neighbour interpolation, which for the integer factor of the
  quick-start config (8 -> 32) replicates each pixel into a 4x4 block: no grey levels are
  invented and random crops shift the digit by whole quarter-pixels.
  """
  pixels, labels = digits_pixels()
  images = np.round(pixels * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
  with open(DIGITS_SPLIT_FILE, encoding='utf-8') as f:
    split = json.load(f)

  def part(name):
    index = np.asarray(split[name])
    rgb = np.repeat(images[index][..., None], 3, axis=-1)
    resized = tf.image.resize(rgb, [resize_size, resize_size], method='nearest')
    return resized.numpy().astype(np.uint8), labels[index].astype(np.int32)

  return {'train': part('train'), 'test': part('test')}


# ---------------------------------------------------------------------------- prepared

PREPARED = 'prepared'  # config.dataset of a folder written by `alexnet_jax.data.prepare`.
PREPARED_FORMAT = 'alexnet_jax.prepared/1'
PREPARED_INDEX = 'index.json'  # written last: a folder without it is not (yet) prepared.
PREPARED_STATS = 'stats.npz'  # `data.stats` format: mean image, RGB mean, PCA.
_PREPARED_FEATURES = {'image': tf.io.FixedLenFeature([], tf.string),
                      'label': tf.io.FixedLenFeature([], tf.int64)}


def prepared_shard_name(split: str, index: int, num_shards: int) -> str:
  """The file name of shard `index` of a prepared split."""
  return f'{split}-{index:05d}-of-{num_shards:05d}.tfrecord'


def prepared_record(jpeg: bytes, label: int) -> bytes:
  """One serialized record of a prepared shard: a tf.train.Example {'image', 'label'}."""
  return tf.train.Example(features=tf.train.Features(feature={
      'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
  })).SerializeToString(deterministic=True)  # map order fixed: same bytes in any process


def parse_prepared(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Serialized records (any shape) -> {'encoded': JPEG bytes, 'label': int32}."""
  if serialized.shape.rank == 0:
    ex = tf.io.parse_single_example(serialized, _PREPARED_FEATURES)
  else:
    ex = tf.io.parse_example(serialized, _PREPARED_FEATURES)
  return {'encoded': ex['image'], 'label': tf.cast(ex['label'], tf.int32)}


def read_segments(files: tf.Tensor, skips: tf.Tensor, takes: tf.Tensor) -> tf.data.Dataset:
  """Serialized records: takes[i] records of files[i] after its first skips[i], in turn."""
  return tf.data.Dataset.from_tensor_slices((files, skips, takes)).flat_map(
      lambda f, s, t: tf.data.TFRecordDataset(f, buffer_size=1 << 20).skip(s).take(t))


@functools.lru_cache(maxsize=8)
def _prepared_index_of(data_dir: str) -> dict:
  path = paths.resolve(data_dir) / PREPARED_INDEX
  if not path.exists():
    progress = (paths.resolve(data_dir) / '.progress').exists()
    raise DataError(
        f"dataset='prepared' reads a folder written by `python -m alexnet_jax.data.prepare`; "
        f'{path} does not exist' + (' (the preparation there is unfinished: rerun it to resume)'
                                    if progress else '') + f' (--config.data_dir={data_dir}).')
  index = json.loads(path.read_text())
  if index.get('format') != PREPARED_FORMAT:
    raise DataError(f'{path} is of format {index.get("format")!r}; this version reads '
                    f'{PREPARED_FORMAT!r}: prepare the dataset again.')
  return index


def prepared_index(config) -> dict:
  """The index.json of the prepared dataset in config.data_dir."""
  if not config.data_dir:
    raise DataError("dataset='prepared' needs --config.data_dir=DIR, the output of "
                    '`python -m alexnet_jax.data.prepare`.')
  return _prepared_index_of(str(paths.resolve(config.data_dir)))


def prepared_stats_path(config) -> str:
  """Where the preparation saved the training set's statistics."""
  return str(paths.resolve(config.data_dir) / prepared_index(config)['stats']['file'])


def _prepared_split(config, split: str) -> ShardedSplit:
  index = prepared_index(config)
  if split not in index['splits']:
    raise DataError(f"The prepared dataset in {config.data_dir} has splits "
                    f"{sorted(index['splits'])}; got split={split!r}.")
  settings = index['settings']
  if settings['resize_size'] != config.resize_size:
    raise DataError(f'The prepared images in {config.data_dir} are {settings["resize_size"]}x'
                    f'{settings["resize_size"]}; config.resize_size={config.resize_size}: set '
                    f'--config.resize_size={settings["resize_size"]} or prepare again.')
  shards = index['splits'][split]['shards']
  root = paths.resolve(config.data_dir)
  return ShardedSplit(files=tuple(str(root / s['file']) for s in shards),
                      counts=tuple(s['num_examples'] for s in shards),
                      location=f'{root}[{split}]', side=settings['resize_size'])


# ---------------------------------------------------------------------------- all sources


def _info(config, class_names, num_examples: Callable[[str], int]) -> DatasetInfo:
  """DatasetInfo of config's training and evaluation splits, counted by `num_examples`."""
  return DatasetInfo(len(class_names), num_examples(config.train_split),
                     num_examples(config.eval_split), tuple(class_names))


class _Synthetic:
  """dataset='synthetic': ImageNet's split sizes, random images made whole."""

  @staticmethod
  def info(config) -> DatasetInfo:
    return DatasetInfo(config.num_classes, SYNTHETIC_NUM_TRAIN, SYNTHETIC_NUM_EVAL,
                       tuple(str(i) for i in range(config.num_classes)))

  @staticmethod
  def split(config, split: str) -> Split:
    n = SYNTHETIC_NUM_TRAIN if split == config.train_split else SYNTHETIC_NUM_EVAL
    return SyntheticSplit(num_examples=n, num_classes=config.num_classes)


class _Digits:
  """dataset='digits': scikit-learn's 8x8 digits, upscaled, held in memory."""

  @staticmethod
  def info(config) -> DatasetInfo:
    arrays = digits_arrays(config.resize_size)
    return _info(config, [str(i) for i in range(10)],
                 lambda s: len(_digits_split(arrays, s)[1]))

  @staticmethod
  def split(config, split: str) -> Split:
    images, labels = _digits_split(digits_arrays(config.resize_size), split)
    images = tf.constant(images)
    return IndexedSplit(labels=labels,
                        load=lambda i: tf.cast(tf.gather(images, i), tf.float32),
                        describe=lambda i: f'digits[{split}][{i}]', may_fail=False,
                        location=f'digits[{split}]')


class _Folder:
  """dataset='folder': ROOT/<split>/<class>/*.jpg."""

  @staticmethod
  def info(config) -> DatasetInfo:
    return _info(config, folder_class_names(config),
                 lambda s: len(list_folder(split_dir(config, s))[1]))

  @staticmethod
  def split(config, split: str) -> Split:
    return _folder_split(config, split)


class _Prepared:
  """dataset='prepared': the shards of `alexnet_jax.data.prepare`."""

  @staticmethod
  def info(config) -> DatasetInfo:
    return _info(config, prepared_index(config)['class_names'],
                 lambda s: _prepared_split(config, s).num_examples)

  @staticmethod
  def split(config, split: str) -> Split:
    return _prepared_split(config, split)


class _Tfds:
  """Any other name: a dataset of the installed tensorflow-datasets (ImageNet)."""

  @staticmethod
  def info(config) -> DatasetInfo:
    builder = tfds_builder(config)
    return _info(config, builder.info.features['label'].names,
                 functools.partial(tfds_num_examples, builder))

  @staticmethod
  def split(config, split: str) -> Split:
    builder = tfds_builder(config)
    decode = _decoder(config)
    if config.cache:  # small dataset: exact permutations from an in-memory copy.
      encoded, labels = _tfds_in_memory(config.dataset, _data_dir(config), split)
      encoded = tf.constant(encoded)
      return IndexedSplit(labels=labels, load=lambda i: decode(tf.gather(encoded, i)),
                          describe=lambda i: f'{config.dataset}[{split}][{i}]', may_fail=False,
                          location=f'{config.dataset}[{split}]')
    return StreamSplit(num_examples=tfds_num_examples(builder, split),
                       process_records=functools.partial(_tfds_records, builder, split),
                       decode=decode,
                       location=f'{config.dataset}[{split}]')


# config.dataset -> the source that answers for it; any other name is a TFDS dataset.
_SOURCES = {'synthetic': _Synthetic, 'digits': _Digits, 'folder': _Folder, PREPARED: _Prepared}


def _source(config):
  return _SOURCES.get(config.dataset, _Tfds)


def dataset_info(config) -> DatasetInfo:
  """Number of classes, split sizes and class names of config.dataset."""
  return _source(config).info(config)


def _digits_split(arrays, split: str) -> tuple[np.ndarray, np.ndarray]:
  if split not in arrays:
    raise DataError(f"dataset='digits' has splits {sorted(arrays)}; got split={split!r}.")
  return arrays[split]


def open_split(config, split: str) -> Split:
  """The examples of `split` of config.dataset, read through the interface of `_Split`."""
  return _source(config).split(config, split)
