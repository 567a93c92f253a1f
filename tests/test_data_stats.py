"""Training-set statistics against NumPy, the workdir cache, and the command line."""

import os
import sys

import numpy as np
from PIL import Image
import pytest

from alexnet_jax.data import sources as data_sources
from alexnet_jax.data import stats as data_stats
from configs import digits

import conftest


def _colour_folder(root, n=12, size=16):
  """Lossless square PNGs of `size`: with resize_size == size the squares are these arrays."""
  rng = np.random.default_rng(0)
  images = []
  for i in range(n):
    # Correlated channels, as in photographs, so that the PCA has three distinct components.
    grey = rng.uniform(0, 200, [size, size, 1])
    image = np.clip(grey + rng.normal([30, 0, -20], [20, 10, 5], [size, size, 3]), 0, 255)
    images.append(image.astype(np.uint8))
    folder = root / 'train' / f'c{i % 2}'
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[-1]).save(folder / f'{i:03d}.png')
  config = conftest.config('alexnet', dataset='folder', data_dir=str(root), eval_split='train',
                           resize_size=size)
  return config, np.stack(images).astype(np.float64)


def test_statistics_match_numpy(tmp_path):
  config, images = _colour_folder(tmp_path)
  stats = data_stats.compute_stats(config, num_images=None)
  np.testing.assert_allclose(stats['mean_image'], images.mean(axis=0), atol=1e-3)
  np.testing.assert_allclose(stats['rgb_mean'], images.reshape(-1, 3).mean(axis=0), atol=1e-3)
  covariance = np.cov(images.reshape(-1, 3).T / 255.0, bias=True)
  eigval, eigvec = stats['eigval'], stats['eigvec']
  np.testing.assert_allclose(eigval, np.linalg.eigvalsh(covariance)[::-1], rtol=1e-4)
  assert np.all(np.diff(eigval) < 0)  # decreasing, like the published values
  np.testing.assert_allclose(eigvec @ np.diag(eigval) @ eigvec.T, covariance, atol=1e-6)
  np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-5)
  assert int(stats['num_images']) == 12


def test_unreadable_images_are_left_out_of_the_statistics(tmp_path):
  config, images = _colour_folder(tmp_path)
  (tmp_path / 'train/c0/broken.jpg').write_bytes(b'not a jpeg')
  stats = data_stats.compute_stats(config, num_images=0)
  assert int(stats['num_images']) == 12
  np.testing.assert_allclose(stats['mean_image'], images.mean(axis=0), atol=1e-3)


def test_stats_are_cached_in_the_workdir(tmp_path, monkeypatch):
  config = digits.get_config()
  workdir = str(tmp_path / 'work')
  stats = data_stats.training_stats(config, workdir)
  train_x, _ = data_sources.digits_arrays(config.resize_size)['train']
  np.testing.assert_allclose(stats['rgb_mean'], train_x.reshape(-1, 3).mean(axis=0), rtol=1e-5)
  assert int(stats['num_images']) == 1437  # digits: the whole train split

  def fail(*args, **kwargs):
    raise AssertionError('recomputed instead of reading the cache')

  monkeypatch.setattr(data_stats, 'compute_stats', fail)
  monkeypatch.setattr(data_stats, '_COMPUTED', {})
  cached = data_stats.training_stats(config, workdir)
  np.testing.assert_array_equal(cached['mean_image'], stats['mean_image'])
  config.resize_size = 24  # a cache for another size is not used
  with pytest.raises(AssertionError, match='recomputed'):
    data_stats.training_stats(config, workdir)


@pytest.mark.slow
def test_command_line_writes_a_usable_npz(tmp_path):
  output = tmp_path / 'stats.npz'
  conftest.run([sys.executable, '-m', 'alexnet_jax.data.stats', '--config=configs/digits.py',
                f'--output={output}', '--num_images=200'], check=True,
               env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
  stats = data_stats.load_stats(str(output))
  assert stats['mean_image'].shape == (32, 32, 3) and int(stats['num_images']) == 200
  assert stats['eigvec'].shape == (3, 3) and stats['eigval'].shape == (3,)
