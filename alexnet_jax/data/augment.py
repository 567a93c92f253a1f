"""The paper's data augmentation (§4.1) as pure TensorFlow functions of an image and its draws.

Every random choice comes from `position_draws`: stateless draws keyed by (config.seed, epoch,
position in the epoch), so a position always gets the same crop, flip and colour shift, which is
what makes training resumable exactly.

Images are float32 [H, W, 3] on the paper's 0..255 pixel scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

# The pixel scale the paper works on: 8-bit RGB values, 0..255.
PIXEL_MAX = 255.0

# §4.1: PCA of the RGB pixel values of the ImageNet training set, on a 0..1 pixel scale. The paper
# gives no numbers; these are the widely quoted published ImageNet values (fb.resnet.torch's
# ImageNet PCA, listed in docs/paper.md under §4.1). Eigenvalues in decreasing order; the
# eigenvectors are the COLUMNS, rows are R, G, B. `config.pca_file` (an .npz with 'eigval' and
# 'eigvec', e.g. written by `python -m alexnet_jax.data.stats`) replaces them.
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]], np.float32)

# Order of the ten test crops (§4.1): the five patches, then the same five mirrored.
TEN_CROP_ORDER = ('top_left', 'top_right', 'bottom_left', 'bottom_right', 'centre',
                  'top_left_mirrored', 'top_right_mirrored', 'bottom_left_mirrored',
                  'bottom_right_mirrored', 'centre_mirrored')


# Every training image's random numbers: 3 uniform on [0, 1) (crop row, crop column, flip) and 3
# standard normal (§4.1's lighting coefficients), a function of (seed, epoch, position) only.
NUM_DRAWS = 6
# Positions whose draws come from one key, as one [DRAW_BLOCK, NUM_DRAWS] draw: a window of
# examples gets its numbers from a few vectorised ops instead of ~20 small ops per image
# (TensorFlow's stateless ops take one key each, and a tf.data stage pays per op per element).
DRAW_BLOCK = 64


def _block_draws(epoch_seed: tf.Tensor, block: tf.Tensor) -> tf.Tensor:
  """The draws [DRAW_BLOCK, NUM_DRAWS] of positions [block * DRAW_BLOCK, (block + 1) * ...)."""
  key = tf.random.experimental.stateless_fold_in(epoch_seed, block)
  uniform_key, normal_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  return tf.concat([tf.random.stateless_uniform([DRAW_BLOCK, 3], uniform_key),
                    tf.random.stateless_normal([DRAW_BLOCK, 3], normal_key)], axis=1)


def position_draws(epoch_seed: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
  """float32 [..., NUM_DRAWS]: the random numbers of each training position of an epoch.

  epoch_seed: int64 [2], (config.seed, epoch); positions: int64 of any shape. A position's
  numbers depend on (epoch_seed, position) only, not on which others are asked with it, so a
  resumed run, another process count or another window size draws the same for it.
  """
  positions = tf.convert_to_tensor(positions, tf.int64)
  if positions.shape.rank == 0:
    return _block_draws(epoch_seed, positions // DRAW_BLOCK)[positions % DRAW_BLOCK]
  flat = tf.reshape(positions, [-1])
  blocks, which = tf.unique(flat // DRAW_BLOCK, out_idx=tf.int64)
  per_block = tf.map_fn(lambda block: _block_draws(epoch_seed, block), blocks,
                        fn_output_signature=tf.float32)
  draws = tf.gather_nd(per_block, tf.stack([which, flat % DRAW_BLOCK], axis=1))
  return tf.reshape(draws, tf.concat([tf.shape(positions), [NUM_DRAWS]], 0))


def crop(image: tf.Tensor, top: tf.Tensor, left: tf.Tensor, size: int) -> tf.Tensor:
  """The size x size patch of `image` [H, W, C] whose top-left pixel is (top, left).

  Cut as rows of size * C contiguous values from the [H, W * C] view: a row copy each, where
  the [H, W, C] slice copies 3-value blocks (measured ~2-3% of the training pipeline's time).
  Static H and W keep it to a few ops per image.
  """
  height, width, channels = image.shape
  if height is None or width is None:
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
  rows = tf.reshape(image, tf.stack([height, width * channels]))
  patch = tf.slice(rows, tf.stack([top, left * channels]), [size, size * channels])
  return tf.reshape(patch, [size, size, channels])


def random_offset(uniform: tf.Tensor, length: int, size: int) -> tf.Tensor:
  """§4.1: the start (int32) of a window of `size` at a uniformly random place in `length`,
  from uniform draws on [0, 1) (any shape): every one of the length - size + 1 starts is equally
  likely, so the patch is always entirely inside the image (the paper's 224 of 256: 33 starts
  per side)."""
  starts = length - size + 1
  offset = tf.cast(uniform * starts, tf.int32)
  return tf.minimum(offset, starts - 1)  # float32 rounding can never reach `starts`.


def center_offsets(height, width, size: int):
  """(top, left) of the central size x size patch of a height x width image (ints or tensors);
  rounds down."""
  return (height - size) // 2, (width - size) // 2


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central size x size patch (the single-crop test patch)."""
  shape = tf.shape(image)
  return crop(image, *center_offsets(shape[0], shape[1], size), size)


def horizontal_flip(image: tf.Tensor) -> tf.Tensor:
  """§4.1's horizontal reflection: column j becomes column W-1-j.

  tf.reverse, not the slice image[:, ::-1]: TensorFlow's negative-stride slice copies element
  by element, about 1 ms for a 224x224x3 patch on one core, which capped the whole training
  pipeline at about 1,000 images/s on 2 cores; tf.reverse is 12 times faster (measured).
  """
  return tf.reverse(image, axis=[-2])


def lighting_offset(normal: tf.Tensor, eigval: tf.Tensor, eigvec: tf.Tensor, std: float,
                    scale: str) -> tf.Tensor:
  """§4.1's RGB offset [..., 3] of each image: P @ (a * lambda) with a ~ N(0, std), on 0..255.

  Args:
    normal: [..., 3] standard normal draws (a = std * normal), fresh for an image each time it
      is used.
    eigval: [3] eigenvalues of the RGB covariance on a 0..1 pixel scale.
    eigvec: [3, 3] eigenvectors as columns (rows R, G, B).
    std: the standard deviation of a_i (§4.1: 0.1).
    scale: 'paper': the formula as written with 0..1 eigenvalues, the result times 255.
      'cuda_convnet': P @ (a * sqrt(lambda_255)) with lambda_255 = lambda * 255**2, the
      eigenvalues on the 0..255 scale, as Krizhevsky's cuda-convnet2 code did.
  """
  eigval = tf.cast(eigval, tf.float32)
  eigvec = tf.cast(eigvec, tf.float32)
  alpha = tf.cast(normal, tf.float32) * std
  if scale == 'paper':
    weights = alpha * eigval * PIXEL_MAX
  elif scale == 'cuda_convnet':
    weights = alpha * tf.sqrt(eigval * PIXEL_MAX**2)
  else:
    raise ValueError(f"pca_lighting_scale={scale!r}; expected 'paper' or 'cuda_convnet'.")
  return tf.linalg.matvec(eigvec, weights)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """§4.1's training augmentation, one sequence: `choices` turns training images' draws
  (`position_draws`) into everything random about them (the crop position, the flip, the
  lighting shift); the host's float patch (`float_patch`) and the uint8 patch that the device
  finishes (`uint8_patch`, then `data.on_device`) both apply those same choices, so they cannot
  draw differently."""
  size: int  # the patch side (config.image_size)
  square: tuple[int, int]  # (height, width) of the images cut (config.resize_size twice)
  random_crop: bool
  random_flip: bool
  pca_lighting: bool
  eigval: np.ndarray  # [3], 0..1 pixel scale
  eigvec: np.ndarray  # [3, 3], eigenvectors as columns
  lighting_std: float
  lighting_scale: str

  def choices(self, draws: tf.Tensor) -> dict[str, tf.Tensor]:
    """Draws [..., NUM_DRAWS] -> {'crop': int32 [..., 3], the patch's (top, left, flip), and
    'lighting': float32 [..., 3], the RGB shift (zeros without lighting)}, for any number of
    images at once (a window of examples in a few ops)."""
    height, width = self.square
    if self.random_crop:
      top = random_offset(draws[..., 0], height, self.size)
      left = random_offset(draws[..., 1], width, self.size)
    else:
      top, left = (tf.fill(tf.shape(draws)[:-1], offset)
                   for offset in center_offsets(height, width, self.size))
    flip = (tf.cast(draws[..., 2] < 0.5, tf.int32) if self.random_flip
            else tf.zeros_like(top))
    shift = (lighting_offset(draws[..., 3:6], self.eigval, self.eigvec, self.lighting_std,
                             self.lighting_scale) if self.pca_lighting
             else tf.zeros(tf.concat([tf.shape(draws)[:-1], [3]], 0)))
    return {'crop': tf.stack([top, left, flip], axis=-1), 'lighting': shift}

  def float_patch(self, square: tf.Tensor, choices: dict[str, tf.Tensor],
                  mean: np.ndarray | None) -> tf.Tensor:
    """The float32 training patch of one image: §2's mean subtracted from the square, then the
    patch cut, reflected and shifted as its `choices` say."""
    top, left, flip = tf.unstack(choices['crop'])
    image = crop(subtract_mean(square, mean), top, left, self.size)
    image = tf.cond(flip > 0, lambda: horizontal_flip(image), lambda: image)
    return image + choices['lighting'] if self.pca_lighting else image

  def uint8_patch(self, square: tf.Tensor, choices: dict[str, tf.Tensor]
                  ) -> dict[str, tf.Tensor]:
    """What the device needs to finish the same patch (`data.on_device`): {'image': the uint8
    patch as cut, 'crop': int32 [top, left, flip], 'lighting': the shift}. The device reflects
    it (a uint8 reflection costs the host ~25 us per image; the device, nothing measurable)."""
    top, left, _ = tf.unstack(choices['crop'])
    return {'image': crop(to_uint8(square), top, left, self.size), **choices}


def subtract_mean(square: tf.Tensor, mean: np.ndarray | None) -> tf.Tensor:
  """§2: the training set's mean (image [R, R, 3] or RGB [1, 1, 3]) subtracted from a square
  image (uint8 squares are cast to float32 first), before any patch is cut from it; None:
  nothing subtracted."""
  square = tf.cast(square, tf.float32)
  return square if mean is None else square - mean


def to_uint8(square: tf.Tensor) -> tf.Tensor:
  """A square as uint8 (rounded) for the device to finish; uint8 squares pass unchanged."""
  if square.dtype == tf.uint8:
    return square
  return tf.cast(tf.round(tf.clip_by_value(square, 0.0, PIXEL_MAX)), tf.uint8)


def eval_patches(square: tf.Tensor, mean: np.ndarray | None, size: int,
                 ten_crop: bool) -> tf.Tensor:
  """What the network sees of a square image at test time: the mean subtracted, then the
  central patch [size, size, 3] or §4.1's ten patches [10, size, size, 3].

  The one preprocessing of every evaluation (the eval pipeline, predict, the figures).
  """
  return test_patches(subtract_mean(square, mean), size, ten_crop)


def test_patches(image: tf.Tensor, size: int, ten_crop: bool) -> tf.Tensor:
  """The central patch or the ten patches of `image`, of its dtype (uint8 patches are what the
  device finishes, `data.on_device`)."""
  return ten_patches(image, size) if ten_crop else center_crop(image, size)


def ten_patches(image: tf.Tensor, size: int) -> tf.Tensor:
  """§4.1's ten test patches [10, size, size, 3], in the order of `TEN_CROP_ORDER`.

  The four corner patches and the central patch, then each of those five mirrored
  horizontally (the mirror of a patch, not the patch of the mirrored image).
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  bottom, right = height - size, width - size
  five = [crop(image, 0, 0, size), crop(image, 0, right, size), crop(image, bottom, 0, size),
          crop(image, bottom, right, size), center_crop(image, size)]
  return tf.stack(five + [horizontal_flip(patch) for patch in five])
