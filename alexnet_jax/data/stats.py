"""Training-set statistics: §2's mean image (and RGB mean) and §4.1's PCA of the RGB values.

  python -m alexnet_jax.data.stats --config=configs/alexnet.py --output=stats.npz \
      [--num_images=10000] [--config.data_dir=...]
  python -m alexnet_jax.data.stats --workdir=RUN   # a run's own, into RUN/data_stats.npz

writes an .npz that `config.stats_file` (mean image / RGB mean) and `config.pca_file` (eigval,
eigvec) can name. Without a stats_file, the training loop calls `training_stats`, which computes
the same thing from config.stats_num_images training images once and saves it in the workdir;
commands that only read a run use `saved_stats`, which computes and writes nothing.

Statistics are over the §2 "square" images (short side rescaled to resize_size, central patch),
exactly as the input pipeline produces them before augmentation. Images of a folder that cannot
be read are left out of the sample (its 'num_images' counts the readable ones) and named, each
with the reason, in one warning.
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import io
import time

from absl import logging
import numpy as np
import tensorflow as tf

from alexnet_jax import cli
from alexnet_jax import config as config_lib
from alexnet_jax import paths
from alexnet_jax.data import augment
from alexnet_jax.data import sources as data_sources
from alexnet_jax.errors import RunError

STATS_FILENAME = 'data_stats.npz'  # in the workdir.
# The sample of training images is drawn with a fixed seed, independent of config.seed, so that
# runs with different seeds subtract the same mean.
STATS_SAMPLE_SEED = 0
_BATCH = 64
_LOG_EVERY_IMAGES = 2048


@tf.autograph.experimental.do_not_convert  # (as the pipeline's: see its docstring)
def _square_images(config, num_images: int | None
                   ) -> tuple[tf.data.Dataset, np.ndarray | int, data_sources.Split]:
  """Batches {'image': squares (uint8-valued float32), 'index'}, the indices asked for (a count
  for a stream), and the split."""
  split = data_sources.open_split(config, config.train_split)
  n = split.num_examples if not num_images or num_images <= 0 else min(num_images,
                                                                       split.num_examples)
  # A folder is sorted by class: an indexed split is sampled uniformly (seeded); a stream (TFDS
  # wrote its records shuffled) gives its first n.
  ds, indices = split.sample(
      n, lambda total, k: np.random.RandomState(STATS_SAMPLE_SEED).permutation(total)[:k])
  ds = ds.map(lambda ex: {'image': ex['square'], 'index': ex['index']})
  return ds.batch(_BATCH).prefetch(2), (n if indices is None else indices), split


class StatsSums:
  """Running sums over square images from which `finish` gives the statistics.

  The sums are on the 0..255 scale, so for uint8-valued images (every prepared square) they
  are integers, exact in float64 up to 2**53: order-independent, and the same however the
  images were split between workers or shards (`merge`).
  """

  def __init__(self, resize_size: int):
    self.resize_size = resize_size
    self.pixel_sum = np.zeros([resize_size, resize_size, 3])  # per-pixel sum
    self.outer_sum = np.zeros([3, 3])  # sum of x x^T over every pixel
    self.count = 0

  def add(self, images: np.ndarray) -> None:
    """Adds a batch [n, R, R, 3] (or one image [R, R, 3]) on the 0..255 scale."""
    images = np.asarray(images, np.float64).reshape((-1, self.resize_size, self.resize_size, 3))
    self.pixel_sum += images.sum(axis=0)
    rgb = images.reshape(-1, 3)
    self.outer_sum += rgb.T @ rgb
    self.count += len(images)

  def add_squares(self, squares: np.ndarray, outers: np.ndarray) -> None:
    """Adds uint8 images [n, R, R, 3] whose sums of x x^T over their pixels (`outers`,
    [n, 3, 3]) were computed elsewhere (in the preparation's parallel stage); the same sums as
    `add`."""
    self.pixel_sum += squares.sum(axis=0, dtype=np.int64)
    self.outer_sum += outers.sum(axis=0)
    self.count += len(squares)

  def merge(self, other: 'StatsSums') -> None:
    self.pixel_sum += other.pixel_sum
    self.outer_sum += other.outer_sum
    self.count += other.count

  def arrays(self) -> dict[str, np.ndarray]:
    """The sums as arrays (to save progress); `from_arrays` reads them back."""
    return {'pixel_sum': self.pixel_sum, 'outer_sum': self.outer_sum,
            'count': np.int64(self.count)}

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray]) -> 'StatsSums':
    sums = cls(arrays['pixel_sum'].shape[0])
    sums.pixel_sum = np.asarray(arrays['pixel_sum'], np.float64)
    sums.outer_sum = np.asarray(arrays['outer_sum'], np.float64)
    sums.count = int(arrays['count'])
    return sums

  def finish(self, dataset: str) -> dict[str, np.ndarray]:
    """The statistics (see `compute_stats`) of the images added."""
    if self.count == 0:
      raise data_sources.DataError(f'No readable training images in {dataset!r}.')
    r, n = self.resize_size, self.count
    mean_image = self.pixel_sum / n
    rgb_mean = mean_image.mean(axis=(0, 1)) / augment.PIXEL_MAX
    covariance = self.outer_sum / (n * r * r * augment.PIXEL_MAX**2) - np.outer(rgb_mean,
                                                                                 rgb_mean)
    eigval, eigvec = np.linalg.eigh(covariance)
    # A covariance has no negative eigenvalues; rounding makes those of grey images about -1e-17,
    # and the 'cuda_convnet' lighting takes their square root.
    eigval = np.maximum(eigval, 0.0)
    order = np.argsort(eigval)[::-1]
    return {'mean_image': mean_image.astype(np.float32),
            'rgb_mean': (rgb_mean * augment.PIXEL_MAX).astype(np.float32),
            'eigval': eigval[order].astype(np.float32),
            'eigvec': eigvec[:, order].astype(np.float32),
            'num_images': np.int64(n), 'resize_size': np.int64(r),
            'dataset': np.str_(dataset)}


def compute_stats(config, num_images: int | None = None) -> dict[str, np.ndarray]:
  """Mean image, RGB mean and the eigen-decomposition of the RGB covariance of training images.

  Args:
    config: the run's config (dataset, data_dir, train_split, resize_size).
    num_images: how many training images to use; None or <= 0: all of them.

  Returns:
    'mean_image' float32 [R, R, 3] and 'rgb_mean' float32 [3] on the 0..255 scale; 'eigval' [3]
    (decreasing) and 'eigvec' [3, 3] (columns, rows R, G, B) of the covariance of RGB pixel values
    on a 0..1 scale, as `augment.lighting_offset` expects; 'num_images', 'resize_size', 'dataset'.
  """
  ds, asked, split = _square_images(config, num_images)
  n = asked if isinstance(asked, int) else len(asked)
  sums = StatsSums(config.resize_size)
  start, next_log = time.time(), _LOG_EVERY_IMAGES
  seen = []
  for batch in ds.as_numpy_iterator():
    sums.add(batch['image'])
    seen.append(batch['index'])
    if sums.count >= next_log or sums.count == n:
      logging.info('data_stats: %d / %d images (%.0f images/s)', sums.count, n,
                   sums.count / max(time.time() - start, 1e-9))
      next_log += _LOG_EVERY_IMAGES
  read = np.concatenate([np.zeros(0, np.int64)] + seen)
  missing = [] if isinstance(asked, int) else np.setdiff1d(asked, read)  # streams cannot fail
  if sums.count == 0:
    raise data_sources.DataError(f'No readable training images in {config.dataset!r} '
                                 f'(data_dir={config.data_dir!r})' +
                                 (f'; the first: {split.unreadable(int(missing[0]))}.'
                                  if len(missing) else '.'))
  if len(missing):
    logging.warning('data_stats: %d of %d images were unreadable and left out:\n  %s',
                    len(missing), n, '\n  '.join(split.unreadable(int(i)) for i in missing))
  return sums.finish(config.dataset)


def save_stats(path: str, stats: dict[str, np.ndarray]) -> None:
  """Writes `stats` to `path` atomically (a reader never sees a half-written file)."""
  buffer = io.BytesIO()
  np.savez(buffer, **stats)
  paths.write_atomic(path, buffer.getvalue())


def load_stats(path: str) -> dict[str, np.ndarray]:
  """The arrays of a statistics .npz (as written by `save_stats`)."""
  with np.load(io.BytesIO(paths.resolve(path).read_bytes())) as data:
    return {k: data[k] for k in data.files}


def _given_rgb_mean(config) -> np.ndarray | None:
  """config.mean_rgb as the [1, 1, 3] mean to subtract, or None where the data give the mean."""
  if config.mean != 'channel' or config.get('mean_rgb') is None:
    return None
  return np.asarray(config.mean_rgb, np.float32).reshape(1, 1, 3)


def needs_stats(config) -> bool:
  """Whether a run of `config` subtracts a mean computed from its training data (not one
  that config.mean_rgb gives)."""
  return (config.mean != 'none' and config.dataset != 'synthetic'
          and _given_rgb_mean(config) is None)


def mean_to_subtract(config, stats: dict[str, np.ndarray] | None) -> np.ndarray | None:
  """What §2 subtracts from every square image: the mean image [R, R, 3] (config.mean='image'),
  the RGB mean [1, 1, 3] ('channel': config.mean_rgb where given, else the data's), or None
  ('none', or synthetic data without config.mean_rgb). `stats` may be None where
  `needs_stats` is False."""
  given = _given_rgb_mean(config)
  if given is not None:
    return given
  if not needs_stats(config):
    return None
  if config.mean == 'channel':
    return np.asarray(stats['rgb_mean'], np.float32).reshape(1, 1, 3)
  mean_image = np.asarray(stats['mean_image'], np.float32)
  size = config.resize_size
  if mean_image.shape != (size, size, 3):
    raise data_sources.DataError(
        f'The mean image is {mean_image.shape}, config.resize_size is {size}: recompute it '
        '(python -m alexnet_jax.data.stats) or fix config.stats_file.')
  return mean_image


def _matches(stats: dict[str, np.ndarray], config) -> bool:
  return (str(stats.get('dataset')) == config.dataset
          and int(stats.get('resize_size', -1)) == config.resize_size)


# Statistics computed in this process, by (dataset, data_dir, train_split, resize_size, cache,
# num_images): two runs of one process (tests, the ablation sweep) compute them once.
_COMPUTED: dict[tuple, dict[str, np.ndarray]] = {}


def training_stats(config, workdir: str, is_writer: bool = True
                   ) -> dict[str, np.ndarray] | None:
  """The statistics a training run uses: config.stats_file, else a prepared dataset's own, else
  the workdir's, else computed.

  Computed from config.stats_num_images training images (all of them for 'digits') by
  `compute_stats` and saved as workdir/data_stats.npz (by the process with `is_writer`); reused
  by later runs in the workdir if they match the dataset and resize_size. None where the run
  subtracts no mean, or the one config.mean_rgb gives (nothing is computed or written).
  """
  if not needs_stats(config):
    return None
  if config.stats_file:
    return load_stats(config.stats_file)
  path = paths.resolve(workdir) / STATS_FILENAME
  if config.dataset == data_sources.PREPARED:  # The preparation computed them from every image.
    stats = load_stats(data_sources.prepared_stats_path(config))
    if is_writer:  # The run keeps its own copy (evaluate, predict and figures read it).
      save_stats(path, stats)
    logging.info('Using the statistics of the prepared dataset (%d images).',
                 int(stats['num_images']))
    return stats
  if path.exists():
    stats = load_stats(path)
    if _matches(stats, config):
      logging.info('Using the data statistics in %s.', path)
      return stats
    logging.warning('%s is for another dataset or resize_size: recomputing.', path)
  num_images = 0 if config.dataset == 'digits' else config.stats_num_images
  fields = ('dataset', 'data_dir', 'train_split', 'resize_size', 'resize_antialias', 'cache')
  key = tuple(config[k] for k in fields) + (num_images,)
  if key not in _COMPUTED:
    logging.info('Computing data statistics from %s training images.', num_images or 'all')
    _COMPUTED[key] = compute_stats(config, num_images)
  stats = _COMPUTED[key]
  if is_writer:
    save_stats(path, stats)
    logging.info('Saved the data statistics to %s.', path)
  return stats


def saved_stats(config, workdir: str) -> dict[str, np.ndarray] | None:
  """The statistics a finished run used, read only: config.stats_file or workdir/data_stats.npz.

  None where the run subtracts no mean, or config.mean_rgb's (a run imported by
  `alexnet_jax.weights.import_weights` has no data_stats.npz); RunError, naming the command
  that makes them, where they are missing.
  """
  if not needs_stats(config):
    return None
  path = paths.resolve(config.stats_file or paths.resolve(workdir) / STATS_FILENAME)
  if not path.exists():
    raise RunError(f'{path} does not exist: the run\'s data statistics (its mean) are missing. '
                   f'Recompute them with `python -m alexnet_jax.data.stats --workdir={workdir}`.')
  return load_stats(path)


# ---------------------------------------------------------------------------- command line


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file (e.g. configs/alexnet.py).')
  flags.DEFINE_string('workdir', None, 'Instead of --config: the workdir of a run; its own '
                      'config is used and the result written to WORKDIR/data_stats.npz.')
  flags.DEFINE_string('output', None, 'Where to write the statistics (.npz); default '
                      'stats.npz, or WORKDIR/data_stats.npz with --workdir.')
  flags.DEFINE_integer('num_images', None,
                       'Training images to use (default: config.stats_num_images; 0: all).')


def main(argv) -> None:
  """Computes the statistics of the configured training split and writes --output."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if (f.config is None) == (f.workdir is None):
    raise app.UsageError('Give either --config=FILE or --workdir=RUN.')
  if f.workdir:
    config = config_lib.read_saved(f.workdir)[0]
    output = f.output or str(paths.resolve(f.workdir) / STATS_FILENAME)
  else:
    config, output = f.config, f.output or 'stats.npz'
  config_lib.validate(config, num_devices=1)
  num_images = config.stats_num_images if f.num_images is None else f.num_images
  stats = compute_stats(config, num_images)
  save_stats(output, stats)
  print(f'Wrote {output}: {int(stats["num_images"])} images, '
        f'RGB mean {np.round(stats["rgb_mean"], 2)}, eigval {np.round(stats["eigval"], 4)}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
