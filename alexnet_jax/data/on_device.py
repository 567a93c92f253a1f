"""The input's float work, done on the device inside the jitted step: uint8 patches in, the
network's float32 images out.

The host (`data.pipeline` with on_device=True) decodes and cuts the patches with the same
choices as the float path (`augment.TrainAugment`); it sends the uint8 patch (150 KB at 224x224,
against 600 KB in float32) with 24 bytes of what it chose: the crop position, whether to reflect
it, and the lighting's RGB shift. What `finisher` does with them is what the host path does, on
the same float operands (the reflected patch minus the reflected mean window is the reflection
of their difference), so the two give the same values (tested in tests/test_prepare.py):
- training (§2, §4.1): the patch is reflected where chosen, the mean image's window at the
  patch's position, reflected with it, is subtracted; then the shift of §4.1's PCA lighting is
  added to every pixel;
- evaluation: the mean's central patch, or its ten patches (§4.1), is subtracted.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Keys of a training batch that only the finishing uses.
AUX_KEYS = ('crop', 'lighting')


def finisher(config, mean: np.ndarray | None) -> Callable[[dict], dict]:
  """batch -> batch with float32 'image' (and without AUX_KEYS), for a jitted step.

  Float images (the host path, synthetic data) pass unchanged; uint8 training batches carry
  'crop' and 'lighting', evaluation batches are [b, S, S, 3] or [b, 10, S, S, 3] patches.
  `mean` is `stats.mean_to_subtract`: [R, R, 3], [1, 1, 3] or None.
  """
  size = config.image_size
  mean = None if mean is None else np.asarray(mean, np.float32)
  per_pixel = mean is not None and mean.shape[0] > 1
  if per_pixel:
    from alexnet_jax.data import augment  # pylint: disable=g-import-not-at-top  (TensorFlow)
    centre = np.asarray(augment.test_patches(mean, size, ten_crop=False))
    ten = np.asarray(augment.test_patches(mean, size, ten_crop=True))

  def window(crop):  # the mean under one training patch, mirrored if the patch is
    top, left, flipped = crop[0], crop[1], crop[2]
    m = lax.dynamic_slice(jnp.asarray(mean), (top, left, 0), (size, size, 3))
    return jnp.where(flipped > 0, m[:, ::-1, :], m)

  def finish(batch: dict) -> dict:
    image = batch['image']
    if image.dtype != jnp.uint8:
      return batch
    out = {k: v for k, v in batch.items() if k not in AUX_KEYS}
    x = image.astype(jnp.float32)
    if 'crop' in batch:  # training patches, reflected here where the host chose to
      flipped = batch['crop'][:, 2, None, None, None] > 0
      x = jnp.where(flipped, x[:, :, ::-1, :], x)
      if per_pixel:
        x = x - jax.vmap(window)(batch['crop'])
      elif mean is not None:
        x = x - mean
      x = x + batch['lighting'][:, None, None, :]
    elif per_pixel:
      x = x - (ten if x.ndim == 5 else centre)
    elif mean is not None:
      x = x - mean
    out['image'] = x
    return out

  return finish
