"""Training-set statistics: §2's mean image (and RGB mean) and §4.1's PCA of the RGB values.

  python -m alexnet_jax.data_stats --config=configs/alexnet.py --output=stats.npz \
      [--num_images=10000] [--config.data_dir=...]

writes an .npz that `config.stats_file` (mean image / RGB mean) and `config.pca_file` (eigval,
eigvec) can name. Without a stats_file, `input_pipeline` calls `get_stats`, which computes the
same thing from config.stats_num_images training images once and caches it in the workdir.

Statistics are over the §2 "square" images (short side rescaled to resize_size, central patch),
exactly as the input pipeline produces them before augmentation.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from alexnet_jax import augment
from alexnet_jax import data_sources

STATS_FILENAME = 'data_stats.npz'  # in the workdir.
# The sample of training images is drawn with a fixed seed, independent of config.seed, so that
# runs with different seeds subtract the same mean.
STATS_SAMPLE_SEED = 0
_BATCH = 64
_LOG_EVERY_IMAGES = 2048


def _square_images(config, num_images: int | None) -> tuple[tf.data.Dataset, int]:
  """Batches of square training images (uint8-valued float32) and how many are asked for."""
  split = data_sources.open_split(config, config.train_split)
  n = split.num_examples if not num_images or num_images <= 0 else min(num_images,
                                                                       split.num_examples)
  if isinstance(split, data_sources.SyntheticSplit):
    raise data_sources.DataError("dataset='synthetic' has no statistics; use config.mean=None.")
  if isinstance(split, data_sources.StreamSplit):
    # TFDS wrote the records in a shuffled order: the first n are a random sample.
    ds = split.records(0, 1).take(n).map(lambda ex: split.decode(ex['image']),
                                         num_parallel_calls=tf.data.AUTOTUNE)
  else:
    # A folder is sorted by class: sample uniformly instead of taking the first n.
    indices = np.random.RandomState(STATS_SAMPLE_SEED).permutation(split.num_examples)[:n]
    ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64)).map(
        split.load, num_parallel_calls=tf.data.AUTOTUNE)
    if split.may_fail:
      ds = ds.ignore_errors()
  return ds.batch(_BATCH).prefetch(2), n


def compute_stats(config, num_images: int | None = None) -> dict[str, np.ndarray]:
  """Mean image, RGB mean and the eigen-decomposition of the RGB covariance of training images.

  Args:
    config: the run's config (dataset, data_dir, train_split, resize_size).
    num_images: how many training images to use; None or <= 0: all of them.

  Returns:
    'mean_image' float32 [R, R, 3] and 'rgb_mean' float32 [3] on the 0..255 scale; 'eigval' [3]
    (decreasing) and 'eigvec' [3, 3] (columns, rows R, G, B) of the covariance of RGB pixel values
    on a 0..1 scale, as `augment.pca_lighting` expects; 'num_images', 'resize_size', 'dataset'.
  """
  ds, n = _square_images(config, num_images)
  r = config.resize_size
  pixel_sum = np.zeros([r, r, 3])
  outer_sum = np.zeros([3, 3])  # sum of x x^T over all pixels, 0..1 scale.
  count, start, next_log = 0, time.time(), _LOG_EVERY_IMAGES
  for batch in ds.as_numpy_iterator():
    batch = batch.astype(np.float64)
    pixel_sum += batch.sum(axis=0)
    rgb = batch.reshape(-1, 3) / augment.PIXEL_MAX
    outer_sum += rgb.T @ rgb
    count += len(batch)
    if count >= next_log or count == n:
      logging.info('data_stats: %d / %d images (%.0f images/s)', count, n,
                   count / max(time.time() - start, 1e-9))
      next_log += _LOG_EVERY_IMAGES
  if count == 0:
    raise data_sources.DataError(f'No readable training images in {config.dataset!r} '
                                 f'(data_dir={config.data_dir!r}).')
  if count < n:
    logging.warning('data_stats: %d of %d images were unreadable and skipped.', n - count, n)
  mean_image = pixel_sum / count
  rgb_mean = mean_image.mean(axis=(0, 1)) / augment.PIXEL_MAX
  covariance = outer_sum / (count * r * r) - np.outer(rgb_mean, rgb_mean)
  eigval, eigvec = np.linalg.eigh(covariance)
  # A covariance has no negative eigenvalues; rounding makes those of grey images about -1e-17,
  # and the 'cuda_convnet' lighting takes their square root.
  eigval = np.maximum(eigval, 0.0)
  order = np.argsort(eigval)[::-1]
  return {'mean_image': mean_image.astype(np.float32),
          'rgb_mean': (rgb_mean * augment.PIXEL_MAX).astype(np.float32),
          'eigval': eigval[order].astype(np.float32),
          'eigvec': eigvec[:, order].astype(np.float32),
          'num_images': np.int64(count), 'resize_size': np.int64(r),
          'dataset': np.str_(config.dataset)}


def save_stats(path: str, stats: dict[str, np.ndarray]) -> None:
  """Writes `stats` to `path` atomically (a reader never sees a half-written file)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, suffix='.npz', delete=False) as f:
    np.savez(f, **stats)
  os.replace(f.name, path)


def load_stats(path: str) -> dict[str, np.ndarray]:
  """The arrays of a statistics .npz (as written by `save_stats`)."""
  with np.load(os.path.expanduser(path)) as data:
    return {k: data[k] for k in data.files}


# Statistics computed in this process, by (dataset, data_dir, train_split, resize_size, cache,
# num_images): train_iterator and eval_iterator of one run then compute them once.
_COMPUTED: dict[tuple, dict[str, np.ndarray]] = {}


def get_stats(config, workdir: str | None) -> dict[str, np.ndarray]:
  """The statistics a run uses: config.stats_file, else cached in the workdir, else computed.

  Computed from config.stats_num_images training images (all of them for 'digits') by
  `compute_stats`, saved as workdir/data_stats.npz by process 0, and reused on later runs if
  they match the dataset and resize_size.
  """
  if config.stats_file:
    return load_stats(config.stats_file)
  num_images = 0 if config.dataset == 'digits' else config.stats_num_images
  path = os.path.join(workdir, STATS_FILENAME) if workdir else None
  if path and os.path.exists(path):
    stats = load_stats(path)
    if (str(stats.get('dataset')) == config.dataset
        and int(stats.get('resize_size', -1)) == config.resize_size):
      logging.info('Using the data statistics in %s.', path)
      return stats
    logging.warning('%s is for another dataset or resize_size: recomputing.', path)
  fields = ('dataset', 'data_dir', 'train_split', 'resize_size', 'resize_antialias', 'cache')
  key = tuple(config.get(k) for k in fields) + (num_images,)
  if key not in _COMPUTED:
    logging.info('Computing data statistics from %s training images.', num_images or 'all')
    _COMPUTED[key] = compute_stats(config, num_images)
  stats = _COMPUTED[key]
  if path and jax.process_index() == 0:
    save_stats(path, stats)
    logging.info('Saved the data statistics to %s.', path)
  return stats


# ---------------------------------------------------------------------------- command line



def _define_flags() -> None:
  # Defined only when run as a command: the library must not claim `--config` in the global
  # absl flag namespace that main.py also uses.
  config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/alexnet.py).')
  flags.DEFINE_string('output', 'stats.npz', 'Where to write the statistics (.npz).')
  flags.DEFINE_integer('num_images', None,
                       'Training images to use (default: config.stats_num_images; 0: all).')
  flags.mark_flags_as_required(['config'])


def main(argv) -> None:
  """Computes the statistics of the configured training split and writes --output."""
  del argv
  config, output = flags.FLAGS.config, flags.FLAGS.output
  num_images = flags.FLAGS.num_images
  if num_images is None:
    num_images = config.stats_num_images
  stats = compute_stats(config, num_images)
  save_stats(output, stats)
  print(f'Wrote {output}: {int(stats["num_images"])} images, '
        f'RGB mean {np.round(stats["rgb_mean"], 2)}, eigval {np.round(stats["eigval"], 4)}')


if __name__ == '__main__':
  _define_flags()
  logging.set_verbosity(logging.INFO)
  app.run(main)
