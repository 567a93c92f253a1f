"""torchvision's AlexNet state dict and the 'owt' variant's parameters: key names and layouts.

torchvision's `alexnet()` is `features` (conv 0, 3, 6, 8, 10, each followed by a ReLU, max pools
after 0, 3 and 10), an AdaptiveAvgPool2d((6, 6)), then `classifier` (Dropout, Linear 1, ReLU,
Dropout, Linear 4, ReLU, Linear 6): our 'owt' variant layer for layer, dropout included (before
fc6 and fc7). What differs is the layout:
  - PyTorch convolution weights are [out, in, kh, kw] (OIHW), ours [kh, kw, in, out] (HWIO);
  - a Linear weight is [out, in] and computes x @ W.T, our Dense kernel is [in, out];
  - PyTorch flattens conv5's pooled [C, 6, 6] maps in (C, H, W) order before fc6, we flatten our
    [6, 6, C] maps in (H, W, C) order: fc6's input rows are permuted, not only transposed.
Pure NumPy; reading files is `read_state_dict`'s (safetensors always, .pth with PyTorch).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from alexnet_jax.errors import one_line
from alexnet_jax.errors import UserError

# torchvision's module -> our layer.
CONV_LAYERS = {'features.0': 'conv1', 'features.3': 'conv2', 'features.6': 'conv3',
               'features.8': 'conv4', 'features.10': 'conv5'}
FC_LAYERS = {'classifier.1': 'fc6', 'classifier.4': 'fc7', 'classifier.6': 'fc8'}
LOGITS_WEIGHT = 'classifier.6.weight'  # [num_classes, 4096]: where the number of classes is read
# Wrappers that training scripts put around a state dict ({'state_dict': ..., 'epoch': ...}),
# and the prefix torch.nn.DataParallel adds to every key.
_WRAPPERS = ('state_dict', 'model')
_PARALLEL_PREFIX = 'module.'

# (kernels, kernel size, input channels) of conv1..conv5 and the widths of fc6, fc7: torchvision's
# AlexNet, which is alexnet_jax.core.models' 'owt' (the test holds the two equal).
_CONVS = ((64, 11, 3), (192, 5, 64), (384, 3, 192), (256, 3, 384), (256, 3, 256))
_POOLED = 6  # AdaptiveAvgPool2d((6, 6)) before fc6
_FC_WIDTH = 4096


def expected_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
  """torchvision key -> shape of every tensor of its AlexNet with `num_classes` outputs."""
  shapes = {}
  for (module, _), (out, k, cin) in zip(CONV_LAYERS.items(), _CONVS):
    shapes[f'{module}.weight'] = (out, cin, k, k)
    shapes[f'{module}.bias'] = (out,)
  fc_in = _CONVS[-1][0] * _POOLED * _POOLED
  for module, (cin, out) in zip(FC_LAYERS, ((fc_in, _FC_WIDTH), (_FC_WIDTH, _FC_WIDTH),
                                            (_FC_WIDTH, num_classes))):
    shapes[f'{module}.weight'] = (out, cin)
    shapes[f'{module}.bias'] = (out,)
  return shapes


def unwrap(state: Mapping[str, Any], source: str = 'the state dict') -> dict[str, Any]:
  """The state dict itself: unwrapped from {'state_dict': ...} or {'model': ...}, without
  DataParallel's 'module.' prefix."""
  if isinstance(state, Mapping) and LOGITS_WEIGHT not in state:
    state = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), state)
  if not isinstance(state, Mapping):
    raise UserError(f'{source} holds a {type(state).__name__}, not a state dict of tensors: '
                    "save the model's state_dict() (torch.save(model.state_dict(), PATH)).")
  keys = list(state)
  if keys and all(isinstance(k, str) and k.startswith(_PARALLEL_PREFIX) for k in keys):
    state = {k[len(_PARALLEL_PREFIX):]: v for k, v in state.items()}
  return dict(state)


def num_classes_of(state: Mapping[str, Any], source: str = 'the state dict') -> int:
  """Outputs of the network: the rows of classifier.6.weight."""
  if LOGITS_WEIGHT not in state:
    raise UserError(f'{source} lacks {LOGITS_WEIGHT!r} (the last layer, [num_classes, 4096]): '
                    f'it is not a torchvision AlexNet state dict (its keys: '
                    f'{_first(sorted(map(str, state)))}).')
  shape = np.shape(state[LOGITS_WEIGHT])
  if len(shape) != 2 or shape[0] < 1:
    raise UserError(f'{source}: {LOGITS_WEIGHT!r} has the shape {list(shape)}, expected '
                    '[num_classes, 4096].')
  return int(shape[0])


def check(state: Mapping[str, Any], num_classes: int, source: str = 'the state dict') -> None:
  """UserError naming the missing keys, the unexpected keys, or the tensors of a wrong shape
  (with the expected one), where `state` is not torchvision's AlexNet of `num_classes`."""
  expected = expected_shapes(num_classes)
  missing = [k for k in expected if k not in state]
  unexpected = sorted(str(k) for k in state if k not in expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f'lacks {_first(missing)}')
    if unexpected:
      parts.append(f'has keys torchvision\'s AlexNet does not: {_first(unexpected)}')
    raise UserError(f'{source} {" and ".join(parts)}: it is not a state dict of '
                    "torchvision.models.alexnet(), whose keys are features.{0,3,6,8,10} and "
                    'classifier.{1,4,6} (.weight, .bias).')
  wrong = [f'{k} is {list(np.shape(state[k]))}, expected {list(shape)}'
           for k, shape in expected.items() if tuple(np.shape(state[k])) != shape]
  if wrong:
    raise UserError(f'{source} does not have the shapes of torchvision\'s AlexNet with '
                    f'{num_classes} classes: {"; ".join(wrong)}.')


def to_params(state: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """Our 'owt' parameters ({'conv1': {'kernel', 'bias'}, ..., 'fc8': ...}, float32) from a
  checked torchvision state dict (`check`)."""
  as_array = lambda key: np.asarray(state[key], np.float32)
  params = {}
  for module, layer in CONV_LAYERS.items():
    params[layer] = {'kernel': as_array(f'{module}.weight').transpose(2, 3, 1, 0),  # OIHW->HWIO
                     'bias': as_array(f'{module}.bias')}
  for module, layer in FC_LAYERS.items():
    weight = as_array(f'{module}.weight')
    if layer == 'fc6':
      # Input j of PyTorch's fc6 is conv5's (c, h, w) with j = (c * 6 + h) * 6 + w; ours is
      # (h, w, c) with j = (h * 6 + w) * C + c.
      out, channels = weight.shape[0], _CONVS[-1][0]
      kernel = weight.reshape(out, channels, _POOLED, _POOLED).transpose(2, 3, 1, 0)
      kernel = kernel.reshape(-1, out)
    else:
      kernel = weight.T
    params[layer] = {'kernel': kernel, 'bias': as_array(f'{module}.bias')}
  # Contiguous copies: the transposes above are views of the file's arrays.
  return {layer: {k: np.ascontiguousarray(v) for k, v in p.items()} for layer, p in params.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file, or of a .pth / .pt / .bin file (needs PyTorch), as
  NumPy arrays, unwrapped (`unwrap`). UserError, naming the file, where it cannot be read."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise UserError(f'--file={path}: {"not a file" if os.path.exists(path) else "no such file"}'
                    '; pass the .pth or .safetensors file of torchvision\'s AlexNet weights.')
  extension = os.path.splitext(path)[1].lower()
  if extension == '.safetensors':
    state = _read_safetensors(path)
  elif extension in ('.pth', '.pt', '.bin'):
    state = _read_torch(path)
  else:
    raise UserError(f'--file={path}: unknown format {extension or "(no extension)"!r}; pass a '
                    '.pth (PyTorch) or a .safetensors file.')
  state = unwrap(state, path)
  return {k: _to_numpy(v, k, path) for k, v in state.items()}


def _read_safetensors(path: str) -> dict[str, Any]:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors_numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError, ValueError...)
    raise UserError(f'{path} cannot be read as a safetensors file ({one_line(e)}).') from None


def _read_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(
        f'{path} is a PyTorch file and PyTorch is not installed: `pip install torch`, or give a '
        '.safetensors file, converted where PyTorch is: python -c "import torch, '
        'safetensors.torch; safetensors.torch.save_file(torch.load(\'alexnet-owt-7be5be79.pth\')'
        ', \'alexnet.safetensors\')"') from None
  try:
    # weights_only: a .pth is a pickle, and only this refuses to run code from the file.
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (UnpicklingError, RuntimeError...)
    raise UserError(f'{path} cannot be read as a PyTorch state dict ({one_line(e)[:300]}); '
                    "save the model's state_dict() with torch.save.") from None


def _to_numpy(value: Any, key: str, path: str) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor; float() also reads bfloat16, which NumPy lacks
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    value = value.numpy()
  if not isinstance(value, np.ndarray):
    raise UserError(f'{path}: {key!r} holds a {type(value).__name__}, not a tensor: it is not '
                    'a state dict of torchvision\'s AlexNet.')
  return value


def _first(names: list[str], n: int = 8) -> str:
  """Up to n names, and how many more."""
  more = len(names) - n
  return ', '.join(names[:n]) + (f' and {more} more' if more > 0 else '')
