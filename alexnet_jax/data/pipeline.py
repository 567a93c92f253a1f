"""The tf.data input pipeline: §2's preprocessing and §4.1's augmentation, batched per process.

Training (`train_iterator`) is a pure function of (config.seed, global step): the example at
position g of epoch e is chosen by a permutation seeded with (seed, e), and its crop, flip and
colour shift by stateless draws that depend on (seed, e, g) alone (`augment.position_draws`,
made where each split knows its positions, a window at a time where it can). Resuming at step
t therefore only
needs t: the pipeline starts at the right epoch, skips to the offset inside it before anything is
decoded, and yields exactly the batches an uninterrupted run would have (no iterator
checkpoints, no stateful RNG).

- Sources read by index (folder, digits, TFDS with config.cache): an exact permutation of the
  whole split per epoch.
- TFDS streams (ImageNet): the records in their stored order (TFDS shuffled them once when it
  wrote them) through a shuffle buffer of config.shuffle_buffer seeded with (seed, e); the skip
  reads encoded records but decodes none.
- Prepared shards (dataset='prepared'): each epoch puts the files in an order seeded with
  (seed, e); process p takes the p-th of P equal slices of that sequence, so it reads its own
  files (and parts of at most two others). Its slice is read in windows of config.shuffle_buffer
  examples, each permuted with a seed of (seed, e, window): a resume reads one window, and
  nothing before it.

With `on_device=True` the iterators send what the device needs to finish the image
(`data.on_device`): the uint8 patch (150 KB at 224x224, a quarter of float32's bytes), its crop
position and flip, and the lighting's RGB shift; the choices are the host path's, and the
device's reflection, mean subtraction and lighting give the host path's values. Each image is
decoded and augmented in one tf.data stage (`Split.train_examples`' `finish`).

Unreadable images (an empty, truncated or permission-denied file, or one that is no image;
'folder' only: TFDS validated its images when it wrote them) never end a run. Training: a position
whose image cannot be decoded takes the next example of the epoch's order instead (up to
`sources.FALLBACK_CANDIDATES` tries), so every batch is full and the position -> example map stays a
function of (seed, e, g): resume stays exact; each such file is logged once, with its path, the
reason and the count so far. Evaluation: unreadable images are left out and logged at the end,
each with its path and reason; the accuracy is over the readable ones (masks), and DatasetInfo's
counts are of files, since reading every header up front would take too long for 1.2 M images.

Every function the pipelines hand to tf.data is TensorFlow ops without Python control flow on
tensors, so the iterators (and the statistics' reader) are built under
`tf.autograph.experimental.do_not_convert`: tf.data traces each function as written, and so does
every dataset built inside them (AutoGraph's rewrite of the functions took about 2 of the 6 s
that a 12-step run of configs/tiny.py spends, and changes no value).
"""

from __future__ import annotations

import functools

import math
from typing import Iterator

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from alexnet_jax.data import augment
from alexnet_jax.data import sources as data_sources
from alexnet_jax.data import stats as data_stats
from alexnet_jax.data.sources import DatasetInfo
from alexnet_jax.errors import DataError

PADDING_LABEL = 0  # label of the padding examples of the last eval batch (mask False).


def get_dataset_info(config) -> DatasetInfo:
  """Classes and split sizes of config.dataset; checks they fit config.num_classes."""
  info = data_sources.dataset_info(config)
  if info.num_classes > config.num_classes:
    raise DataError(f'{config.dataset!r} has {info.num_classes} classes but config.num_classes='
                    f'{config.num_classes}: set --config.num_classes={info.num_classes}.')
  if info.num_classes < config.num_classes:
    logging.warning('%s has %d classes; the model has config.num_classes=%d outputs.',
                    config.dataset, info.num_classes, config.num_classes)
  return info


def steps_per_epoch(config, info: DatasetInfo) -> int:
  """Training steps in one epoch: num_train // batch_size (the last partial batch is dropped)."""
  steps = info.num_train // config.batch_size
  if steps < 1:
    raise DataError(f'The train split has {info.num_train} examples, fewer than one batch of '
                    f'config.batch_size={config.batch_size}.')
  return steps


def _per_process(batch_size: int, name: str) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f'config.{name}={batch_size} is not divisible by the '
                     f'{jax.process_count()} processes.')
  return batch_size // jax.process_count()


def num_eval_batches_of(num_examples: int, config) -> int:
  """Batches per process of one pass over a split of `num_examples` (the same on every
  process)."""
  per_process = math.ceil(num_examples / jax.process_count())
  return max(1, math.ceil(per_process / _per_process(config.eval_batch_size, 'eval_batch_size')))


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # parallel maps keep their order: needed for exact resume.
  # Sequential maps stay sequential: the fallback loader must not decode spare candidates ahead.
  options.experimental_optimization.map_parallelization = False
  return options


def _pca(config) -> tuple[np.ndarray, np.ndarray]:
  """config.pca_file's PCA; for a prepared dataset its own; else the published ImageNet one."""
  path = config.pca_file or (data_sources.prepared_stats_path(config)
                             if config.dataset == data_sources.PREPARED else None)
  if path:
    stats = data_stats.load_stats(path)
    return np.asarray(stats['eigval'], np.float32), np.asarray(stats['eigvec'], np.float32)
  return augment.IMAGENET_PCA_EIGVAL, augment.IMAGENET_PCA_EIGVEC


def _train_augment(config) -> augment.TrainAugment:
  """§4.1's training augmentation as `config` sets it (with `_pca`'s lighting)."""
  eigval, eigvec = _pca(config)
  return augment.TrainAugment(config.image_size, (config.resize_size, config.resize_size),
                              config.random_crop, config.random_flip,
                              config.pca_lighting, eigval, eigvec, config.pca_lighting_std,
                              config.pca_lighting_scale)


@tf.autograph.experimental.do_not_convert
def train_iterator(config, *, start_step: int = 0, mean: np.ndarray | None,
                   on_device: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of every global training batch from `start_step` on, forever.

  Yields {'image': float32 [batch_size // process_count, S, S, 3], 'label': int32 [b]}, with
  S = config.image_size, pixels on 0..255 minus the mean. The batch at global step t depends only
  on (config, t): starting at start_step=t gives what an iterator started at 0 gives after t
  batches. `mean` is what §2 subtracts (`stats.mean_to_subtract`). Writes no file.
  on_device: yield instead uint8 'image' [b, S, S, 3], 'crop' int32 [b, 3] and 'lighting'
  float32 [b, 3], which `on_device.finisher(config, mean)` turns into the same float images
  inside the jitted step (synthetic data stays float32: it has nothing to finish).
  """
  info = get_dataset_info(config)
  steps = steps_per_epoch(config, info)
  b = _per_process(config.batch_size, 'batch_size')
  split = data_sources.open_split(config, config.train_split)
  fixed = split.fixed_batches(config, b)
  if fixed is not None:
    return fixed
  split.check_usable()
  augmenter = _train_augment(config)
  augment_fn = (augmenter.uint8_patch if on_device
                else functools.partial(augmenter.float_patch, mean=mean))

  def preprocess(el):
    patch = augment_fn(el['image'], {'crop': el['crop'], 'lighting': el['lighting']})
    out = {**(patch if on_device else {'image': patch}), 'label': el['label']}
    if 'candidates' in el:
      out.update(candidates=el['candidates'], attempt=el['attempt'])
    return out

  order = data_sources.TrainOrder(config.batch_size, b, jax.process_index(), jax.process_count(),
                                  steps, start_step, config.seed, config.shuffle_buffer,
                                  augmenter.choices)
  ds = split.train_examples(order, preprocess)
  ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())
  return _log_unreadable_train(ds, split)


def _log_unreadable_train(ds: tf.data.Dataset, split) -> Iterator[dict[str, np.ndarray]]:
  """The batches, without the bookkeeping; each unreadable image met is logged once."""
  unreadable = set()
  for batch in ds.as_numpy_iterator():
    if 'attempt' in batch:
      # Candidates before the one used (attempt) failed to decode.
      for candidates, attempt in zip(batch.pop('candidates'), batch.pop('attempt')):
        for index in candidates[:attempt]:
          if int(index) not in unreadable:
            unreadable.add(int(index))
            logging.warning('Unreadable image skipped (%d so far), the next example of the epoch '
                            'took its place: %s', len(unreadable), split.unreadable(int(index)))
    yield batch


@tf.autograph.experimental.do_not_convert
def eval_iterator(config, *, split: str | None = None, ten_crop: bool = False,
                  mean: np.ndarray | None, on_device: bool = False
                  ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over an evaluation split: every example once over all processes.

  Yields {'image': float32 [b, S, S, 3] (central patch) or [b, 10, S, S, 3] (§4.1's ten patches
  in `augment.TEN_CROP_ORDER`), 'label': int32 [b], 'mask': bool [b]} with b = eval_batch_size //
  process_count. The last batch is padded (mask False) and every process yields the same number
  of batches. Unreadable images ('folder') are left out and logged at the end, each with its
  path and the reason.
  Each image is `augment.eval_patches` of its square (`mean` subtracted, then cropped).
  on_device: the patches are uint8, without the mean, which `on_device.finisher` subtracts.
  """
  name = split or config.eval_split
  get_dataset_info(config)  # Checks the classes fit num_classes.
  source = data_sources.open_split(config, name)
  b = _per_process(config.eval_batch_size, 'eval_batch_size')
  num_batches = num_eval_batches_of(source.num_examples, config)
  size, p, num_processes = config.image_size, jax.process_index(), jax.process_count()
  image_shape = [10, size, size, 3] if ten_crop else [size, size, 3]
  fixed = source.fixed_batches(config, b, image_shape, num_batches)
  if fixed is not None:
    return fixed
  source.check_usable()

  def preprocess(square, label, index):
    if on_device:
      image = augment.test_patches(augment.to_uint8(square), size, ten_crop)
    else:
      image = augment.eval_patches(square, mean, size, ten_crop)
    return {'image': image, 'label': label, 'index': index, 'mask': True}

  examples, assigned = source.eval_examples(p, num_processes)
  ds = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(image_shape, tf.uint8 if on_device else tf.float32),
      'label': tf.constant(PADDING_LABEL, tf.int32),
      'index': tf.constant(-1, tf.int64), 'mask': False}).repeat()
  ds = ds.concatenate(padding).take(num_batches * b).batch(b)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
  return _log_unreadable_eval(ds, source, assigned)


def _log_unreadable_eval(ds: tf.data.Dataset, source,
                         assigned: np.ndarray | None) -> Iterator[dict[str, np.ndarray]]:
  seen = []
  for batch in ds.as_numpy_iterator():
    seen.append(batch.pop('index')[batch['mask']])
    yield batch
  if source.may_fail:
    skipped = np.setdiff1d(assigned, np.concatenate(seen))
    if len(skipped):
      logging.warning('Evaluation on %s left out %d unreadable images:\n  %s', source.location,
                      len(skipped), '\n  '.join(source.unreadable(int(i)) for i in skipped))
