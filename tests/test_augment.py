"""§4.1's augmentations against NumPy slicing and the closed-form lighting distribution."""

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax.data import augment

DRAWS = 2000


def _keys(n, seed=0):
  base = tf.constant([seed, 7], tf.int64)
  return tf.stack([tf.random.experimental.stateless_fold_in(base, i) for i in range(n)])


def _map_keys(fn, n=DRAWS):
  """fn(key) for n different keys, in one tf.data pass (fast, unlike n eager calls)."""
  keys = _keys(n)
  return next(iter(tf.data.Dataset.from_tensor_slices(keys).map(fn).batch(n))).numpy()


def _coordinate_image(height, width):
  """Pixel (i, j) holds (i, j, i * width + j): a patch tells where it was cut from."""
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([i, j, i * width + j], axis=-1).astype(np.float32)


def _training_patch(image, key, size, *, crop=False, flip=False, lighting=False,
                    lighting_std=0.1, scale='paper'):
  """The training patch of `image` with only the given parts of §4.1's sequence switched on."""
  augmenter = augment.TrainAugment(size, crop, flip, lighting, augment.IMAGENET_PCA_EIGVAL,
                                   augment.IMAGENET_PCA_EIGVEC, lighting_std, scale)
  return augmenter.float_patch(tf.constant(image), key, mean=None)


def test_random_crop_is_inside_and_uniform():
  height, width, size = 12, 14, 8
  image = _coordinate_image(height, width)
  patches = _map_keys(lambda k: _training_patch(image, k, size, crop=True))
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


def test_random_crop_depends_only_on_the_key():
  image = _coordinate_image(10, 10)
  key = tf.constant([3, 4], tf.int64)
  first = _training_patch(image, key, 6, crop=True)
  np.testing.assert_array_equal(first, _training_patch(image, key, 6, crop=True))


def test_flip_is_an_exact_mirror_half_of_the_time():
  image = np.random.RandomState(0).uniform(0, 255, [7, 7, 3]).astype(np.float32)
  np.testing.assert_array_equal(augment.horizontal_flip(tf.constant(image)), image[:, ::-1])
  outputs = _map_keys(lambda k: _training_patch(image, k, 7, flip=True))
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
  outputs = _map_keys(lambda k: _training_patch(image, k, 5, lighting=True, lighting_std=std,
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
  key = tf.constant([5, 6], tf.int64)
  args = (augment.IMAGENET_PCA_EIGVAL, augment.IMAGENET_PCA_EIGVEC, 0.1)
  paper = augment.lighting_offset(key, *args, 'paper').numpy()
  cuda = augment.lighting_offset(key, *args, 'cuda_convnet').numpy()
  along = lambda v: np.linalg.solve(augment.IMAGENET_PCA_EIGVEC, v)[0]
  assert along(cuda) / along(paper) == pytest.approx(ratio, rel=1e-4)


@pytest.mark.parametrize('scale', ['paper', 'cuda_convnet'])
def test_lighting_offset_is_the_eigenvectors_as_columns_times_the_draws(scale):
  """§4.1 recomputed: the offset is P (a * w), P's columns the eigenvectors, a the stateless
  N(0, std) draws of the key; using P's rows, or another scale, would break this."""
  key = tf.constant([3, 4], tf.int64)
  eigval, eigvec = augment.IMAGENET_PCA_EIGVAL, augment.IMAGENET_PCA_EIGVEC
  a = tf.random.stateless_normal([3], key, stddev=0.1).numpy().astype(np.float64)
  w = eigval * 255.0 if scale == 'paper' else np.sqrt(eigval * 255.0**2)
  expected = np.asarray(eigvec, np.float64) @ (a * w)
  got = augment.lighting_offset(key, eigval, eigvec, 0.1, scale).numpy()
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
