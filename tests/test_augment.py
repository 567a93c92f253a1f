"""§4.1's augmentations against NumPy slicing and the closed-form lighting distribution."""

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax.data import augment

DRAWS = 2000


def _draws(n, seed=0, epoch=7):
  """The draws of positions 0..n-1 of an epoch."""
  return augment.position_draws(tf.constant([seed, epoch], tf.int64),
                                tf.range(n, dtype=tf.int64))


def _map_draws(fn, n=DRAWS):
  """fn(draws) for n positions' draws, in one tf.data pass (fast, unlike n eager calls)."""
  return next(iter(tf.data.Dataset.from_tensor_slices(_draws(n)).map(fn).batch(n))).numpy()


def _coordinate_image(height, width):
  """Pixel (i, j) holds (i, j, i * width + j): a patch tells where it was cut from."""
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([i, j, i * width + j], axis=-1).astype(np.float32)


def _training_patch(image, draws, size, *, crop=False, flip=False, lighting=False,
                    lighting_std=0.1, scale='paper'):
  """The training patch of `image` with only the given parts of §4.1's sequence switched on."""
  augmenter = augment.TrainAugment(size, image.shape[:2], crop, flip, lighting,
                                   augment.IMAGENET_PCA_EIGVAL, augment.IMAGENET_PCA_EIGVEC,
                                   lighting_std, scale)
  return augmenter.float_patch(tf.constant(image), augmenter.choices(draws), mean=None)


def test_random_crop_is_inside_and_uniform():
  height, width, size = 12, 14, 8
  image = _coordinate_image(height, width)
  patches = _map_draws(lambda d: _training_patch(image, d, size, crop=True))
  tops, lefts = patches[:, 0, 0, 0].astype(int), patches[:, 0, 0, 1].astype(int)
  for patch, top, left in zip(patches, tops, lefts):  # exactly the NumPy slice at that offset
    np.testing.assert_array_equal(patch, image[top:top + size, left:left + size])
  assert tops.min() == 0 and tops.max() == height - size
  assert lefts.min() == 0 and lefts.max() == width - size
  # Uniform over the 5 x 7 positions: every count within 5 standard deviations of n / 35.
  counts = np.zeros([height - size + 1, width - size + 1])
  np.add.at(counts, (tops, lefts), 1)
  expected = DRAWS / counts.size
  assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts


def test_a_positions_draws_depend_on_the_seed_epoch_and_position_only():
  """The same numbers for a position asked alone, in a range, in another window of positions
  or in another order; other numbers in another epoch or with another seed."""
  seed = tf.constant([3, 4], tf.int64)
  positions = np.arange(1000, dtype=np.int64)
  whole = augment.position_draws(seed, positions).numpy()
  assert whole.shape == (1000, augment.NUM_DRAWS)
  for p in (0, 63, 64, 517, 999):
    np.testing.assert_array_equal(augment.position_draws(seed, p).numpy(), whole[p])
  picked = np.random.RandomState(0).permutation(positions)[:300].reshape(3, 100)
  np.testing.assert_array_equal(augment.position_draws(seed, picked).numpy(), whole[picked])
  np.testing.assert_array_equal(augment.position_draws(seed, positions[130:420]).numpy(),
                                whole[130:420])
  other_epoch = augment.position_draws(tf.constant([3, 5], tf.int64), positions).numpy()
  other_seed = augment.position_draws(tf.constant([2, 4], tf.int64), positions).numpy()
  assert not np.any(np.all(other_epoch == whole, axis=1))
  assert not np.any(np.all(other_seed == whole, axis=1))


def test_draws_are_uniform_and_normal_and_independent():
  draws = _draws(20_000).numpy().astype(np.float64)
  uniform, normal = draws[:, :3], draws[:, 3:]
  assert uniform.min() >= 0 and uniform.max() < 1
  n = len(draws)
  np.testing.assert_allclose(uniform.mean(0), 0.5, atol=5 * np.sqrt(1 / 12 / n))
  np.testing.assert_allclose(uniform.var(0), 1 / 12, rtol=0.05)
  for column in uniform.T:  # every tenth of [0, 1) about equally often
    counts = np.histogram(column, 10, (0, 1))[0]
    assert np.all(np.abs(counts - n / 10) < 5 * np.sqrt(n / 10)), counts
  np.testing.assert_allclose(normal.mean(0), 0, atol=5 / np.sqrt(n))
  np.testing.assert_allclose(normal.std(0), 1, rtol=0.05)
  # No correlation between a position's numbers, nor with the next position's (a block edge
  # every DRAW_BLOCK positions included).
  corr = np.corrcoef(draws.T)[np.triu_indices(augment.NUM_DRAWS, 1)]
  assert np.all(np.abs(corr) < 5 / np.sqrt(n)), corr
  neighbours = [np.corrcoef(draws[:-1, j], draws[1:, j])[0, 1] for j in range(augment.NUM_DRAWS)]
  assert np.all(np.abs(neighbours) < 5 / np.sqrt(n)), neighbours


def test_choices_of_many_images_are_each_images_choices():
  augmenter = augment.TrainAugment(224, (256, 256), True, True, True,
                                   augment.IMAGENET_PCA_EIGVAL, augment.IMAGENET_PCA_EIGVEC,
                                   0.1, 'paper')
  draws = _draws(50)
  together = augmenter.choices(draws)
  for i in (0, 7, 49):
    alone = augmenter.choices(draws[i])
    for name in ('crop', 'lighting'):
      np.testing.assert_array_equal(alone[name], together[name][i])
  crops = together['crop'].numpy()
  assert crops[:, :2].min() >= 0 and crops[:, :2].max() <= 32 and set(crops[:, 2]) == {0, 1}


def test_flip_is_an_exact_mirror_half_of_the_time():
  image = np.random.RandomState(0).uniform(0, 255, [7, 7, 3]).astype(np.float32)
  np.testing.assert_array_equal(augment.horizontal_flip(tf.constant(image)), image[:, ::-1])
  outputs = _map_draws(lambda d: _training_patch(image, d, 7, flip=True))
  flipped = np.array([np.array_equal(o, image[:, ::-1]) for o in outputs])
  unchanged = np.array([np.array_equal(o, image) for o in outputs])
  assert np.all(flipped ^ unchanged)
  assert abs(flipped.mean() - 0.5) < 5 * np.sqrt(0.25 / DRAWS)


@pytest.mark.parametrize('scale, weight', [
    ('paper', augment.IMAGENET_PCA_EIGVAL * 255),  # P (a * lambda), times 255
    ('cuda_convnet', np.sqrt(augment.IMAGENET_PCA_EIGVAL * 255**2)),  # P (a * sqrt(lambda_255))
])
def test_pca_lighting_adds_one_offset_along_the_eigenvectors(scale, weight):
  std = 0.1
  image = np.random.RandomState(1).uniform(0, 255, [5, 5, 3]).astype(np.float32)
  eigvec = augment.IMAGENET_PCA_EIGVEC
  outputs = _map_draws(lambda d: _training_patch(image, d, 5, lighting=True, lighting_std=std,
                                                scale=scale))
  shifts = outputs - image
  offsets = shifts[:, 0, 0, :]
  # One RGB offset per image, the same at every pixel.
  np.testing.assert_allclose(shifts, np.broadcast_to(offsets[:, None, None], shifts.shape),
                             atol=1e-3)
  # Coordinates along the eigenvectors: a_i * weight_i with a_i ~ N(0, std), independent.
  alphas = np.linalg.solve(eigvec, offsets.T).T / weight
  assert np.all(np.abs(alphas.mean(axis=0)) < 5 * std / np.sqrt(DRAWS))
  np.testing.assert_allclose(alphas.std(axis=0), std, rtol=0.1)
  assert np.all(np.abs(np.corrcoef(alphas.T)[np.triu_indices(3, 1)]) < 0.1)


def test_cuda_convnet_lighting_is_about_twice_the_paper_along_the_first_component():
  # docs/paper.md: sqrt(0.2175) / 0.2175 = 2.14 times the shift along p1.
  ratio = np.sqrt(augment.IMAGENET_PCA_EIGVAL[0]) / augment.IMAGENET_PCA_EIGVAL[0]
  normal = tf.random.stateless_normal([3], tf.constant([5, 6], tf.int64))
  args = (augment.IMAGENET_PCA_EIGVAL, augment.IMAGENET_PCA_EIGVEC, 0.1)
  paper = augment.lighting_offset(normal, *args, 'paper').numpy()
  cuda = augment.lighting_offset(normal, *args, 'cuda_convnet').numpy()
  along = lambda v: np.linalg.solve(augment.IMAGENET_PCA_EIGVEC, v)[0]
  assert along(cuda) / along(paper) == pytest.approx(ratio, rel=1e-4)


@pytest.mark.parametrize('scale', ['paper', 'cuda_convnet'])
def test_lighting_offset_is_the_eigenvectors_as_columns_times_the_draws(scale):
  """§4.1 recomputed: the offset is P (a * w), P's columns the eigenvectors, a = 0.1 times the
  standard normal draws; using P's rows, or another scale, would break this."""
  normal = tf.random.stateless_normal([3], tf.constant([3, 4], tf.int64))
  eigval, eigvec = augment.IMAGENET_PCA_EIGVAL, augment.IMAGENET_PCA_EIGVEC
  a = 0.1 * normal.numpy().astype(np.float64)
  w = eigval * 255.0 if scale == 'paper' else np.sqrt(eigval * 255.0**2)
  expected = np.asarray(eigvec, np.float64) @ (a * w)
  got = augment.lighting_offset(normal, eigval, eigvec, 0.1, scale).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, np.asarray(eigvec, np.float64).T @ (a * w), atol=1e-3)


def test_ten_crop_is_corners_centre_and_their_mirrors():
  height, width, size = 9, 11, 5
  image = _coordinate_image(height, width)
  crops = augment.ten_patches(tf.constant(image), size).numpy()
  top, left = (height - size) // 2, (width - size) // 2
  five = [image[:size, :size], image[:size, -size:], image[-size:, :size],
          image[-size:, -size:], image[top:top + size, left:left + size]]
  expected = np.stack(five + [p[:, ::-1] for p in five])
  np.testing.assert_array_equal(crops, expected)
  assert len(augment.TEN_CROP_ORDER) == 10
  np.testing.assert_array_equal(augment.center_crop(tf.constant(image), size), five[4])
