"""alexnet_jax/weights/: torchvision's AlexNet weights imported as a run.

The imported network is held against an independent forward pass written here the way PyTorch
computes torchvision's AlexNet (NCHW, OIHW kernels, fc6 over the (C, H, W) flattening, x @ W.T)
on a generated state dict with torchvision's key names and shapes: no PyTorch needed.
"""

import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest
from PIL import Image
from safetensors import numpy as safetensors_numpy

from alexnet_jax import errors
from alexnet_jax.core import checkpoints
from alexnet_jax import config as config_lib
from alexnet_jax.core import run as run_lib
from alexnet_jax.errors import ConfigError
from alexnet_jax.errors import UserError
from alexnet_jax.paper import predict
from alexnet_jax.weights import import_weights
from alexnet_jax.weights import torchvision

# torchvision.models.alexnet(): its state_dict()'s keys and shapes, written out by hand.
TORCHVISION_SHAPES = {
    'features.0.weight': (64, 3, 11, 11), 'features.0.bias': (64,),
    'features.3.weight': (192, 64, 5, 5), 'features.3.bias': (192,),
    'features.6.weight': (384, 192, 3, 3), 'features.6.bias': (384,),
    'features.8.weight': (256, 384, 3, 3), 'features.8.bias': (256,),
    'features.10.weight': (256, 256, 3, 3), 'features.10.bias': (256,),
    'classifier.1.weight': (4096, 256 * 6 * 6), 'classifier.1.bias': (4096,),
    'classifier.4.weight': (4096, 4096), 'classifier.4.bias': (4096,),
    'classifier.6.weight': (1000, 4096), 'classifier.6.bias': (1000,),
}
# torchvision's transforms.Normalize for these weights, on 0..1 pixels.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _state_dict(seed=0):
  """Random tensors of TORCHVISION_SHAPES: weights N(0, 2 / fan_in) (He), so that activations
  stay of order 1 through the eight layers, and small random biases (their mapping counts)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in TORCHVISION_SHAPES.items():
    if key.endswith('.weight'):
      scale = np.sqrt(2 / int(np.prod(shape[1:])))
    else:
      scale = 0.1
    state[key] = rng.standard_normal(shape, np.float32)
    state[key] *= np.float32(scale)
  return state


def _torchvision_forward(state, images):
  """torchvision's AlexNet in eval mode, as PyTorch lays it out: NCHW inputs normalised as its
  transforms do, OIHW kernels, max pools 3/2, flatten (C, H, W), Linear = x @ W.T + b."""
  hi = lax.Precision.HIGHEST
  x = jnp.asarray(((images / 255 - MEAN) / STD).transpose(0, 3, 1, 2))  # NHWC -> NCHW

  def conv(x, module, stride, pad):
    y = lax.conv_general_dilated(x, state[f'{module}.weight'], (stride, stride),
                                 [(pad, pad), (pad, pad)],
                                 dimension_numbers=('NCHW', 'OIHW', 'NCHW'), precision=hi)
    return jax.nn.relu(y + state[f'{module}.bias'][None, :, None, None])

  def pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2), 'VALID')

  def linear(x, module):
    return jnp.matmul(x, state[f'{module}.weight'].T, precision=hi) + state[f'{module}.bias']

  x = pool(conv(x, 'features.0', 4, 2))
  x = pool(conv(x, 'features.3', 1, 2))
  x = conv(x, 'features.6', 1, 1)
  x = conv(x, 'features.8', 1, 1)
  x = pool(conv(x, 'features.10', 1, 1))
  assert x.shape[1:] == (256, 6, 6)  # AdaptiveAvgPool2d((6, 6)) is the identity at 224
  x = x.reshape(x.shape[0], -1)  # torch.flatten(x, 1): (C, H, W) order
  x = jax.nn.relu(linear(x, 'classifier.1'))  # (dropout: the identity in eval mode)
  x = jax.nn.relu(linear(x, 'classifier.4'))
  return np.asarray(linear(x, 'classifier.6'))


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """(state dict, workdir, Imported): a generated state dict saved as .safetensors and imported
  once for the tests of this file."""
  directory = tmp_path_factory.mktemp('torchvision_import')
  state = _state_dict()
  file = str(directory / 'alexnet.safetensors')
  safetensors_numpy.save_file(state, file)
  workdir = str(directory / 'run')
  return state, workdir, import_weights.import_torchvision(file, workdir)


@pytest.mark.slow
def test_logits_equal_an_independent_nchw_forward(imported):
  state, workdir, _ = imported
  run = run_lib.open_run(workdir)
  restored = run.restore()
  images = np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
  # What the pipeline feeds the network: 0..255 minus the run's mean (255 * MEAN).
  ours = np.asarray(restored.model.apply({'params': restored.params}, images - run.mean()))
  reference = _torchvision_forward(state, images)
  assert np.abs(reference).max() > 1  # the random weights keep the logits far from zero
  assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()

  # Dropout where torchvision has it, on the inputs of fc6 and fc7: with every unit dropped
  # fc7 sees zeros and fc8 the ReLU of fc7's bias. (After fc6 and fc7, as in the paper's
  # network, fc8 would see zeros and give its bias.)
  dropped = restored.model.clone(dropout_rate=1.0).apply(
      {'params': restored.params}, images - run.mean(), train=True,
      rngs={'dropout': jax.random.key(0)})
  expected = np.maximum(state['classifier.4.bias'], 0) @ state['classifier.6.weight'].T
  expected = expected + state['classifier.6.bias']
  np.testing.assert_allclose(np.asarray(dropped), np.broadcast_to(expected, (2, 1000)),
                             rtol=1e-5, atol=1e-5)


def test_the_run_opens_like_one_trained_here(imported, tmp_path):
  _, workdir, result = imported
  assert result.num_classes == 1000 and result.num_params == 61_100_840
  run = run_lib.open_run(workdir)
  names = run.class_names()
  assert len(names) == 1000 and names[0] == 'n01440764' and names == sorted(names)
  config = run.config
  assert config.model == 'owt' and config.mean == 'channel' and not config.ten_crop_eval
  np.testing.assert_allclose(config.mean_rgb, 255 * MEAN, rtol=1e-6)
  np.testing.assert_allclose(config.std_rgb, 255 * STD, rtol=1e-6)
  # No data statistics: the mean is the config's.
  assert not os.path.exists(os.path.join(workdir, 'data_stats.npz'))
  np.testing.assert_allclose(run.mean(), (255 * MEAN).reshape(1, 1, 3), rtol=1e-6)
  # One checkpoint, step 0, without an evaluation: 'best' and 'latest' are both it.
  assert checkpoints.complete_steps(checkpoints.checkpoint_dir(workdir)) == [0]

  image = tmp_path / 'photo.png'
  rng = np.random.default_rng(2)
  Image.fromarray(rng.integers(0, 256, (300, 260, 3), np.uint8)).save(image)
  [record] = predict.predict_files(workdir, [str(image)])
  assert len(record['classes']) == 5 and all(c in names for c in record['classes'])
  assert record['classes'] == [names[k] for k in record['labels']]
  assert 0 < sum(record['probabilities']) <= 1 + 1e-6


def test_a_wrapped_state_dict_is_unwrapped():
  state = {k: np.zeros(1, np.float32) for k in TORCHVISION_SHAPES}
  for wrapper in ('state_dict', 'model'):  # what training scripts save, DataParallel's prefix
    wrapped = {wrapper: {'module.' + k: v for k, v in state.items()}, 'epoch': 90}
    assert list(torchvision.unwrap(wrapped)) == list(state)
  assert list(torchvision.unwrap(state)) == list(state)


def _one_line_error(error_info, *expected):
  text = str(error_info.value)
  assert errors.one_line(error_info.value) == text, text  # one line, as every command prints it
  for part in expected:
    assert part in text, text


def test_a_missing_key_is_named_and_nothing_written(tmp_path):
  tiny = {k: np.zeros((1,) * len(s), np.float32) for k, s in TORCHVISION_SHAPES.items()}
  tiny['classifier.6.weight'] = np.zeros((10, 4096), np.float32)
  del tiny['features.3.bias']
  tiny['features.3.running_mean'] = np.zeros((1,), np.float32)
  file = str(tmp_path / 'partial.safetensors')
  safetensors_numpy.save_file(tiny, file)
  with pytest.raises(UserError) as e:
    import_weights.import_torchvision(file, str(tmp_path / 'run'))
  _one_line_error(e, 'partial.safetensors', 'lacks features.3.bias',
                  'features.3.running_mean')
  assert not (tmp_path / 'run').exists()


def test_a_wrong_shape_is_named_with_the_expected_one():
  # Views of one zero: the shapes of the whole network, without its memory.
  state = {k: np.broadcast_to(np.float32(0), s) for k, s in TORCHVISION_SHAPES.items()}
  state['features.0.weight'] = np.broadcast_to(np.float32(0), (11, 11, 3, 64))  # HWIO: ours
  torchvision.check({**state, 'features.0.weight': np.zeros((64, 3, 11, 11))}, 1000)
  with pytest.raises(UserError) as e:
    torchvision.check(state, 1000, 'x.safetensors')
  _one_line_error(e, 'features.0.weight is [11, 11, 3, 64], expected [64, 3, 11, 11]')
  assert torchvision.num_classes_of({'classifier.6.weight': np.zeros((37, 4096))}) == 37


def test_a_pth_without_pytorch_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails, as without PyTorch
  file = tmp_path / 'alexnet-owt-7be5be79.pth'
  file.write_bytes(b'not read')
  with pytest.raises(UserError) as e:
    import_weights.import_torchvision(str(file), str(tmp_path / 'run'))
  _one_line_error(e, 'PyTorch is not installed', 'pip install torch', '.safetensors',
                  'safetensors.torch.save_file')


@pytest.mark.slow
def test_a_workdir_with_checkpoints_is_refused(imported):
  _, workdir, _ = imported
  with pytest.raises(UserError) as e:
    import_weights.import_torchvision('never_read.pth', workdir)
  _one_line_error(e, 'holds checkpoints already', 'new --workdir')


def test_a_given_rgb_mean_needs_the_channel_mean():
  config = import_weights.default_config()
  config_lib.validate(config, num_devices=1)
  config.mean = 'image'
  with pytest.raises(ConfigError, match='config.mean_rgb'):
    config_lib.validate(config, num_devices=1)
  config = import_weights.default_config()
  config.std_rgb = (58.0, 57.0)
  with pytest.raises(ConfigError, match='config.std_rgb'):
    config_lib.validate(config, num_devices=1)
