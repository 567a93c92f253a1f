"""The paper's data augmentation (§4.1) as pure TensorFlow functions of an image and a key.

Every random choice comes from a `tf.random.stateless_*` op keyed by an explicit seed, so the
same key always gives the same crop, flip and colour shift; `input_pipeline` derives the key from
(config.seed, epoch, position in the epoch), which is what makes training resumable exactly.

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


def split_key(key: tf.Tensor, num: int) -> tf.Tensor:
  """`num` independent stateless seeds ([num, 2]) derived from one seed [2]."""
  return tf.random.experimental.stateless_split(key, num)


def crop(image: tf.Tensor, top: tf.Tensor, left: tf.Tensor, size: int) -> tf.Tensor:
  """The size x size patch of `image` whose top-left pixel is (top, left)."""
  patch = image[top:top + size, left:left + size, :]
  return tf.ensure_shape(patch, [size, size, image.shape[-1]])


def random_crop_offsets(image: tf.Tensor, size: int, key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """§4.1: the (top, left) of a size x size patch at a uniformly random position in `image`.

  Every one of the (H - size + 1) x (W - size + 1) positions is equally likely, so the patch is
  always entirely inside the image (the paper's 224 patches of 256 images: 33 x 33 positions).
  """
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  # maxval is exclusive: offsets 0..H-size inclusive.
  top = tf.random.stateless_uniform([], key, minval=0, maxval=height - size + 1, dtype=tf.int32)
  left_key = tf.random.experimental.stateless_fold_in(key, 1)
  left = tf.random.stateless_uniform([], left_key, minval=0, maxval=width - size + 1,
                                     dtype=tf.int32)
  return top, left


def center_offsets(image: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(top, left) of the central size x size patch; rounds down."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  return (height - size) // 2, (width - size) // 2


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central size x size patch (the single-crop test patch)."""
  return crop(image, *center_offsets(image, size), size)


def horizontal_flip(image: tf.Tensor) -> tf.Tensor:
  """§4.1's horizontal reflection: column j becomes column W-1-j.

  tf.reverse, not the slice image[:, ::-1]: TensorFlow's negative-stride slice copies element
  by element, about 1 ms for a 224x224x3 patch on one core, which capped the whole training
  pipeline at about 1,000 images/s on 2 cores; tf.reverse is 12 times faster (measured).
  """
  return tf.reverse(image, axis=[-2])


def flip_decision(key: tf.Tensor) -> tf.Tensor:
  """§4.1: whether to reflect, with probability 1/2 (bool scalar)."""
  return tf.random.stateless_uniform([], key) < 0.5


def lighting_offset(key: tf.Tensor, eigval: tf.Tensor, eigvec: tf.Tensor, std: float,
                    scale: str) -> tf.Tensor:
  """§4.1's RGB offset [3] for one image: P @ (a * lambda) with a ~ N(0, std), on 0..255.

  Args:
    key: stateless seed [2]; one draw of `a` per image each time it is used.
    eigval: [3] eigenvalues of the RGB covariance on a 0..1 pixel scale.
    eigvec: [3, 3] eigenvectors as columns (rows R, G, B).
    std: the standard deviation of a_i (§4.1: 0.1).
    scale: 'paper': the formula as written with 0..1 eigenvalues, the result times 255.
      'cuda_convnet': P @ (a * sqrt(lambda_255)) with lambda_255 = lambda * 255**2, the
      eigenvalues on the 0..255 scale, as Krizhevsky's cuda-convnet2 code did.
  """
  eigval = tf.cast(eigval, tf.float32)
  eigvec = tf.cast(eigvec, tf.float32)
  alpha = tf.random.stateless_normal([3], key, stddev=std)
  if scale == 'paper':
    weights = alpha * eigval * PIXEL_MAX
  elif scale == 'cuda_convnet':
    weights = alpha * tf.sqrt(eigval * PIXEL_MAX**2)
  else:
    raise ValueError(f"pca_lighting_scale={scale!r}; expected 'paper' or 'cuda_convnet'.")
  return tf.linalg.matvec(eigvec, weights)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """§4.1's training augmentation, one sequence: `choices` draws everything random about one
  training image from its key (the crop position, the flip, the lighting shift); the host's
  float patch (`float_patch`) and the uint8 patch that the device finishes (`uint8_patch`, then
  `data.on_device`) both apply those same choices, so they cannot draw differently."""
  size: int  # the patch side (config.image_size)
  random_crop: bool
  random_flip: bool
  pca_lighting: bool
  eigval: np.ndarray  # [3], 0..1 pixel scale
  eigvec: np.ndarray  # [3, 3], eigenvectors as columns
  lighting_std: float
  lighting_scale: str

  def choices(self, square: tf.Tensor, key: tf.Tensor
              ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor | None]:
    """(top, left, flip, RGB shift or None) of the patch cut from `square`, from `key`."""
    crop_key, flip_key, lighting_key = tf.unstack(split_key(key, 3))
    if self.random_crop:
      top, left = random_crop_offsets(square, self.size, crop_key)
    else:
      top, left = center_offsets(square, self.size)
    flip = flip_decision(flip_key) if self.random_flip else tf.constant(False)
    shift = (lighting_offset(lighting_key, self.eigval, self.eigvec, self.lighting_std,
                             self.lighting_scale) if self.pca_lighting else None)
    return top, left, flip, shift

  def float_patch(self, square: tf.Tensor, key: tf.Tensor, mean: np.ndarray | None
                  ) -> tf.Tensor:
    """The float32 training patch: §2's mean subtracted from the square, then the patch cut,
    reflected and shifted as `choices` says."""
    top, left, flip, shift = self.choices(square, key)
    image = crop(subtract_mean(square, mean), top, left, self.size)
    image = tf.cond(flip, lambda: horizontal_flip(image), lambda: image)
    return image if shift is None else image + shift

  def uint8_patch(self, square: tf.Tensor, key: tf.Tensor) -> dict[str, tf.Tensor]:
    """What the device needs to finish the same patch (`data.on_device`): {'image': the uint8
    patch, cut and reflected, 'crop': int32 [top, left, flipped], 'lighting': the shift}."""
    square = to_uint8(square)
    top, left, flip, shift = self.choices(square, key)
    patch = crop(square, top, left, self.size)
    patch = tf.cond(flip, lambda: horizontal_flip(patch), lambda: patch)
    return {'image': patch, 'crop': tf.stack([top, left, tf.cast(flip, tf.int32)]),
            'lighting': tf.zeros([3]) if shift is None else shift}


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
