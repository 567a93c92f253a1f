"""alexnet_jax/figures.py: Figure 3's kernel grid and Figure 4's predictions and neighbours."""

import pytest
import jax
import numpy as np
from PIL import Image

from alexnet_jax.data import sources as data_sources
from alexnet_jax.data import stats as data_stats
from alexnet_jax.paper import figures
from alexnet_jax.core import models
from alexnet_jax.core import run as run_lib
from configs import alexnet


def _independent_tile(kernel):
  return (kernel - kernel.min()) / (kernel.max() - kernel.min())


@pytest.mark.slow
def test_paper_model_grid_has_96_tiles_in_two_column_blocks():
  # A 67-pixel input keeps the FC layers small; conv1's kernel does not depend on it.
  model = models.create_model(alexnet.get_config())
  kernel = np.asarray(models.init_params(model, jax.random.key(0), 67)['conv1']['kernel'])
  assert kernel.shape == (11, 11, 3, 96)
  blocks = figures.column_blocks('paper')
  canvas, positions = figures.filter_grid(kernel, blocks=blocks, columns=16)
  assert blocks == 2 and len(positions) == 96
  for i, (top, left) in enumerate(positions):
    np.testing.assert_allclose(canvas[top:top + 11, left:left + 11], _independent_tile(
        kernel[..., i]), rtol=1e-5, atol=1e-6)
  # Column 1's 48 kernels (the paper's GPU 1) all lie above column 2's.
  assert max(p[0] for p in positions[:48]) + 11 < min(p[0] for p in positions[48:])
  assert len({p for p in positions}) == 96  # no tile overwrites another


def test_one_block_for_variants_without_columns():
  assert figures.column_blocks('one_column') == figures.column_blocks('owt') == 1
  kernel = np.random.RandomState(0).normal(size=(11, 11, 3, 64))
  canvas, positions = figures.filter_grid(kernel, blocks=1)
  assert len(positions) == 64 and canvas.min() >= 0 and canvas.max() <= 1


def test_filters_command_writes_a_png(tiny_workdir, tmp_path):
  out = tmp_path / 'conv1.png'
  info = figures.plot_filters(tiny_workdir, str(out))
  assert info['num_kernels'] == 32 and info['blocks'] == 2
  assert Image.open(out).size[0] > 100


def test_predictions_figure(tiny_workdir, tmp_path):
  out = tmp_path / 'pred.png'
  result = figures.plot_predictions(tiny_workdir, str(out), num_images=4)
  assert Image.open(out).size[0] > 200
  assert result['top5'].shape == (4, 5)
  probs = result['probabilities']
  assert np.all(np.diff(probs, axis=1) <= 0) and np.all(probs.sum(axis=1) <= 1 + 1e-6)


def test_streamed_search_finds_the_brute_force_neighbours():
  rng = np.random.RandomState(0)
  queries, rows = rng.normal(size=(4, 8)), rng.normal(size=(50, 8))
  batches = [(rows[i:i + 16], np.arange(i, min(i + 16, 50))) for i in range(0, 50, 16)]
  rows[7] = rows[3]  # an exact tie, which either index may win
  queries[0] = rows[3] + 0.05
  ids, dists, searched = figures.nearest_neighbours(queries, batches, k=6)
  d = np.linalg.norm(queries[:, None] - rows[None], axis=-1)
  _assert_truly_nearest(ids, dists, d)
  assert set(ids[0, :2]) == {3, 7}
  assert searched == 50


def _assert_truly_nearest(ids, dists, d, rtol=1e-5, atol=0.0):
  """ids/dists are the k nearest of all the columns of the brute-force distances d [Q, N].

  Compares distances, not indices, so that the test does not depend on how ties are broken.
  """
  k = ids.shape[1]
  assert all(len(set(row)) == k for row in ids)  # k distinct neighbours
  np.testing.assert_allclose(dists, np.sort(d, axis=1)[:, :k], rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.take_along_axis(d, ids, axis=1), dists, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_neighbours_are_the_nearest_training_images(tiny_workdir, tmp_path):
  out = tmp_path / 'nn.png'
  found = figures.plot_neighbours(tiny_workdir, str(out), num_queries=3, max_train_images=100)
  assert Image.open(out).size[0] > 200 and found['searched'] == 100
  # Brute force in NumPy on independently preprocessed images: square minus the RGB mean of the
  # run's statistics, central patch by slicing.
  run = run_lib.open_run(tiny_workdir)
  config = run.config
  restored = run.restore()
  model, params = restored.model, restored.params
  mean = data_stats.load_stats(f'{tiny_workdir}/data_stats.npz')['rgb_mean']
  arrays = data_sources.digits_arrays(config.resize_size)
  off, s = (config.resize_size - config.image_size) // 2, config.image_size

  # (Jitted: op by op, the network's forward compiled each operation apart, ~4 s.)
  fc7 = jax.jit(lambda p, x: models.fc7_features(model, p, x))

  def features(images):
    patches = (images.astype(np.float32) - mean)[:, off:off + s, off:off + s]
    return np.asarray(fc7(params, patches), np.float64)

  searched = np.sort(np.random.RandomState(0).permutation(len(arrays['train'][1]))[:100])
  train_f = features(arrays['train'][0][searched])
  query_idx = np.linspace(0, len(arrays['test'][1]) - 1, 3).round().astype(int)
  query_f = features(arrays['test'][0][query_idx])
  d = np.linalg.norm(query_f[:, None] - train_f[None], axis=-1)
  # found['ids'] index the training split; map them to columns of d (all must be searched ones).
  columns = np.searchsorted(searched, found['ids'])
  np.testing.assert_array_equal(searched[columns], found['ids'])
  _assert_truly_nearest(columns, found['distances'], d, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(found['neighbour_labels'], arrays['train'][1][found['ids']])
