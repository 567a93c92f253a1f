"""AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) and Local Response Normalization in Flax.

Variants:
  'paper'      the paper's two-column network (§3.5, Figure 2): conv2, conv4 and conv5 see only
               their own column's half of the channels; 60,965,224 parameters for 1000 classes.
  'one_column' the same widths without the column split: 62,378,344 parameters.
  'owt'        torchvision's single-column "one weird trick" network (64/192/384/256/256, no
               LRN, dropout before FC6 and FC7): 61,100,840 parameters.
  'small'      the same building blocks at small widths for 32x32-ish inputs (the quick start).
  'small_one_column'  'small' without the column split (the §3.2 ablation on small images).

Layouts are NHWC. Images are expected on the paper's scale: 0..255 pixels minus the mean
(`input_std`, where set, then divides each channel as the network's first operation).

The same modules also run one device's share of the network inside `jax.shard_map`
(`AlexNet.split`, used by `alexnet_jax/core/parallel.py`): each parameter then has its local
shape, the slice of the whole network's parameter that this device holds along `model_axis`,
and the layers exchange activations with JAX collectives over that axis only where the scheme
needs them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax.config import VARIANTS
from alexnet_jax.core import kernels as kernels_lib
from alexnet_jax.core import ops
from alexnet_jax.core.kernels import Kernels

ACTIVATIONS = {'relu': nn.relu, 'tanh': jnp.tanh}
SPLITS = ('none', 'columns', 'fc')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """One convolutional layer of a variant."""
  name: str
  features: int
  kernel: int
  stride: int
  padding: tuple[tuple[int, int], tuple[int, int]]
  columns: int  # 2: each half of the output sees only its half of the input (§3.2).
  bias_one: bool  # §5: bias initialised to 1 (conv2, conv4, conv5).
  lrn: bool  # §3.3: LRN after the ReLU.
  pool: bool  # §3.4: max-pool after (the LRN).


def _p(n: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((n, n), (n, n))


# conv1: (224 + 2*2 - 11) // 4 + 1 = 55. The paper's 224 does not fit an 11x11/4 kernel
# exactly ((224 - 11)/4 + 1 = 54.25); we pad 2 on every side as torchvision does (cuda-convnet
# instead pads 3 on the bottom/right only, Caffe crops 227 unpadded; all give 55x55).
_PAPER_CONVS = (
    ConvSpec('conv1', 96, 11, 4, _p(2), 1, False, True, True),
    ConvSpec('conv2', 256, 5, 1, _p(2), 2, True, True, True),
    ConvSpec('conv3', 384, 3, 1, _p(1), 1, False, False, False),  # sees both columns (§3.2)
    ConvSpec('conv4', 384, 3, 1, _p(1), 2, True, False, False),
    ConvSpec('conv5', 256, 3, 1, _p(1), 2, True, False, True),
)
# torchvision's "one weird trick" network (Krizhevsky 2014): no LRN, no columns.
_OWT_CONVS = (
    ConvSpec('conv1', 64, 11, 4, _p(2), 1, False, False, True),
    ConvSpec('conv2', 192, 5, 1, _p(2), 1, True, False, True),
    ConvSpec('conv3', 384, 3, 1, _p(1), 1, False, False, False),
    ConvSpec('conv4', 256, 3, 1, _p(1), 1, True, False, False),
    ConvSpec('conv5', 256, 3, 1, _p(1), 1, True, False, True),
)
# Small variant for 28-32 pixel inputs: conv1 5x5 stride 1 keeps the resolution that an 11x11/4
# kernel would destroy; otherwise the paper's pattern (LRN after conv1/2, columns in conv2/4/5,
# three overlapping pools). 28 -> 13 -> 6 -> 2, 32 -> 15 -> 7 -> 3.
_SMALL_CONVS = (
    ConvSpec('conv1', 32, 5, 1, _p(2), 1, False, True, True),
    ConvSpec('conv2', 64, 5, 1, _p(2), 2, True, True, True),
    ConvSpec('conv3', 96, 3, 1, _p(1), 1, False, False, False),
    ConvSpec('conv4', 96, 3, 1, _p(1), 2, True, False, False),
    ConvSpec('conv5', 64, 3, 1, _p(1), 2, True, False, True),
)
_FC_WIDTHS = {'paper': 4096, 'one_column': 4096, 'owt': 4096, 'small': 256,
              'small_one_column': 256}


def fc_width(variant: str) -> int:
  """Neurons of fc6 and fc7 in `variant`."""
  return _FC_WIDTHS[variant]


def conv_specs(variant: str) -> tuple[ConvSpec, ...]:
  """The convolutional layers of `variant`."""
  if variant == 'paper':
    return _PAPER_CONVS
  if variant == 'one_column':
    return tuple(dataclasses.replace(s, columns=1) for s in _PAPER_CONVS)
  if variant == 'owt':
    return _OWT_CONVS
  if variant == 'small':
    return _SMALL_CONVS
  if variant == 'small_one_column':
    return tuple(dataclasses.replace(s, columns=1) for s in _SMALL_CONVS)
  raise ValueError(f'Unknown AlexNet variant {variant!r}; choose one of {VARIANTS}.')


def local_response_norm(x: jax.Array, *, k: float = 2.0, n: int = 5, alpha: float = 1e-4,
                        beta: float = 0.75, alpha_convention: str = 'paper',
                        impl: str = 'custom', groups: int = 1) -> jax.Array:
  """Local Response Normalization across channels (§3.3), NHWC.

  b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta

  The window is clipped at the first and last channel, as in the paper's sum limits.
  alpha_convention: 'paper' uses alpha as written in §3.3 (TensorFlow's
  `local_response_normalization` too); 'divided' uses alpha / n, the convention of
  cuda-convnet, Caffe and PyTorch (whose `LocalResponseNorm(5, alpha=5e-4)` equals the paper's
  formula as written with alpha=1e-4).
  impl: 'custom' (a hand-written gradient, `ops.lrn_custom`) or 'reduce_window' (the plain form
  and its autodiff gradient); both give the same values.
  groups: normalise each of this many consecutive channel groups on its own (the window stops
  at a group's edge): 2 keeps each of the paper's columns to itself, as the paper's two GPUs
  did (cuda-convnet's `[rnorm1a] inputs=conv1a channels=48 size=5`).
  """
  if alpha_convention == 'divided':
    alpha = alpha / n
  elif alpha_convention != 'paper':
    raise ValueError(f"lrn_alpha_convention must be 'paper' or 'divided', got {alpha_convention!r}")
  if n < 1 or n % 2 != 1:
    raise ValueError(f'LRN window n must be a positive odd number, got {n}')
  dtype = x.dtype
  # The sum of squares is formed in float32: in bfloat16, a^2 summed over 5 channels loses the
  # small alpha * sum term against k = 2 (bfloat16 has 8 bits of mantissa).
  return ops.lrn(x.astype(jnp.float32), k, n, alpha, beta, impl, groups).astype(dtype)


class LocalResponseNorm(nn.Module):
  """Module form of `local_response_norm` (no parameters); defaults are the paper's §3.3."""
  k: float = 2.0
  n: int = 5
  alpha: float = 1e-4
  beta: float = 0.75
  alpha_convention: str = 'paper'
  impl: str = 'custom'
  groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return local_response_norm(x, k=self.k, n=self.n, alpha=self.alpha, beta=self.beta,
                               alpha_convention=self.alpha_convention, impl=self.impl,
                               groups=self.groups)


class ColumnConv(nn.Module):
  """A convolution whose output halves see only their own half of the input (§3.2 columns).

  The kernel is stored as (kh, kw, in_features // columns, features), the layout of a grouped
  convolution, so 'split' and 'grouped' implementations (`kernels.column_impl`) share the
  same parameters.

  With `axis` (inside shard_map), this device computes features / n of the outputs, n the size
  of `axis`: its slice of the kernel's last dimension. A column-split layer (columns == n)
  then sees only its own column's input, which is this device's already; `gather_input` first
  gathers the input channels of all n devices (conv3 of the paper, which sees both columns).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: Any = 'SAME'
  columns: int = 1
  kernels: Kernels = Kernels()  # which implementations: see alexnet_jax/core/kernels.py
  kernel_init: Callable = nn.initializers.normal(0.01)
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32
  axis: str | None = None
  gather_input: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gather_input:
      x = lax.all_gather(x, self.axis, axis=x.ndim - 1, tiled=True)
    n = lax.axis_size(self.axis) if self.axis else 1
    if n > 1 and (self.columns not in (1, n) or self.features % n):
      raise ValueError(f'{self.name}: {self.columns} columns and {self.features} kernels do '
                       f'not split over {n} devices')
    cin = x.shape[-1]
    g = self.columns // n if self.columns >= n else self.columns
    if cin % g or self.features % g:
      raise ValueError(f'{self.name}: {cin} input and {self.features} output channels do not '
                       f'split into {g} columns')
    features = self.features // n
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, cin // g, features), jnp.float32)
    bias = self.param('bias', self.bias_init, (features,), jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    backend = self.kernels.conv_backend
    conv = lambda lhs, rhs, groups=1: ops.conv(lhs, rhs, self.strides, self.padding, groups,
                                               backend)
    if g == 1 and self.strides > 1:
      y = ops.strided_conv(x, kernel, self.strides, self.padding, self.kernels.conv_impl,
                           backend)
    elif g == 1:
      y = conv(x, kernel)
    elif self.kernels.column_impl == 'grouped':
      y = conv(x, kernel, g)
    else:
      xs = jnp.split(x, g, axis=-1)
      ks = jnp.split(kernel, g, axis=-1)
      y = jnp.concatenate([conv(xi, ki) for xi, ki in zip(xs, ks)], axis=-1)
    # The bias is added in float32 so that its gradient is a float32 sum: in bfloat16, XLA:CPU
    # sums through a slow rounding-safe reduce-window tree. A no-op in float32.
    return (y.astype(jnp.float32) + bias).astype(self.dtype)


class Dense(nn.Module):
  """A fully connected layer: flax's nn.Dense (same parameters, initialisation and arithmetic),
  which can also hold one device's slice of the layer inside shard_map.

  The input is flattened to [batch, features] first. With `axis` of size n: `gather` first
  gathers the input over `axis`, along its last dimension ('features', a split input) or its
  first ('batch', every device's images); split='outputs' holds features / n output neurons
  (kernel columns) and returns them; split='inputs' holds the kernel rows of this device's
  slice of the inputs and returns the whole output, its partial products summed over `axis`
  (then the bias, whole on every device).
  """
  features: int
  axis: str | None = None
  split: str = 'outputs'
  gather: str | None = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gather is not None:
      dim = {'features': x.ndim - 1, 'batch': 0}[self.gather]
      x = lax.all_gather(x, self.axis, axis=dim, tiled=True)
    x = x.reshape((x.shape[0], -1))
    n = lax.axis_size(self.axis) if self.axis else 1
    if self.split not in ('outputs', 'inputs'):
      raise ValueError(f"Dense.split must be 'outputs' or 'inputs', got {self.split!r}")
    out = self.features // n if self.split == 'outputs' else self.features
    if out * n != self.features and self.split == 'outputs':
      raise ValueError(f'{self.name}: {self.features} outputs do not split over {n} devices')
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], out), jnp.float32)
    bias = self.param('bias', self.bias_init, (out,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if n > 1 and self.split == 'inputs':
      y = lax.psum(y, self.axis)
    return y + bias


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """torchvision's AdaptiveAvgPool2d((out, out)) for the 'owt' variant; identity at 224 input."""
  h, w = x.shape[1:3]
  if (h, w) == (out, out):
    return x
  rows = []
  for i in range(out):
    r0, r1 = (i * h) // out, -(-((i + 1) * h) // out)
    cols = []
    for j in range(out):
      c0, c1 = (j * w) // out, -(-((j + 1) * w) // out)
      cols.append(jnp.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)))
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


class AlexNet(nn.Module):
  """The paper's network and its variants (see the module docstring).

  Call with `train=True` for dropout (needs a 'dropout' RNG). Every stage's output is sown into
  the 'intermediates' collection ('conv1_out'..'conv5_out' after the activation, 'pool1',
  'pool2', 'pool5', 'fc6_out', 'fc7_out') when that collection is mutable, as `fc7_features`
  does; otherwise sowing costs nothing.

  `split` runs one device's share inside shard_map, over the mesh axis `model_axis` (n devices):
    'none'     the whole network (every other use).
    'columns'  §3.2's two GPUs (n = 2): each device holds one column's kernels of conv1-conv5
               and half of each fully connected layer. The devices exchange activations only at
               conv3's input (both columns' conv2 maps) and at the fully connected layers.
    'fc'       the "one weird trick" (Krizhevsky 2014): the convolutional layers whole on this
               device's images; before fc6 the n devices gather their images' conv features and
               each computes its slice of the fully connected layers for all of them.
  In both, fc6 and fc7 hold output slices (their inputs gathered) and fc8 holds input rows
  (partial logits summed), and the logits returned are those of every image the n devices
  share: the caller (`parallel.py`) keeps its own rows.
  """
  variant: str = 'paper'
  num_classes: int = 1000
  lrn: bool = True
  lrn_k: float = 2.0
  lrn_n: int = 5
  lrn_alpha: float = 1e-4
  lrn_beta: float = 0.75
  lrn_alpha_convention: str = 'paper'
  # §3.2: the columns exchange nothing before conv3, so each normalises its own channels.
  lrn_within_columns: bool = True
  overlapping_pool: bool = True
  activation: str = 'relu'
  dropout_rate: float = 0.5
  weight_init_std: float = 0.01
  bias_init_one: float = 1.0
  dtype: Any = jnp.float32
  kernels: Kernels = Kernels()  # which implementations: see alexnet_jax/core/kernels.py
  split: str = 'none'
  model_axis: str = 'model'
  # config.std_rgb: per-channel divisors of the mean-subtracted RGB input (None: none). Here,
  # not in the input pipeline, so that every path that feeds the network (host and on-device
  # preprocessing, evaluation, predict, figures) divides the same way.
  input_std: tuple[float, float, float] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}')
    act = ACTIVATIONS[self.activation]
    dtype = DTYPES[self.dtype] if isinstance(self.dtype, str) else self.dtype
    w_init = nn.initializers.normal(self.weight_init_std)
    b_init = lambda one: nn.initializers.constant(self.bias_init_one if one else 0.0)
    # §3.4: overlapping pooling, z=3 > s=2; the ablation uses the traditional z = s = 2.
    window, stride = (3, 2) if self.overlapping_pool else (2, 2)

    if self.split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {self.split!r}')
    if self.input_std is not None:
      # Before conv1's zero padding: padding the divided image with zeros is what torchvision
      # does to its normalised input.
      x = x / jnp.asarray(self.input_std, jnp.float32)
    x = x.astype(dtype)
    specs = conv_specs(self.variant)
    # conv1's output feeds conv2's columns half by half: it belongs to them already (§3.2).
    lrn_groups = specs[1].columns if self.lrn_within_columns else 1
    conv_axis = self.model_axis if self.split == 'columns' else None
    fc_axis = None if self.split == 'none' else self.model_axis
    if conv_axis:  # Each device holds one column: its LRN sees only its own channels.
      if max(s.columns for s in specs) != lax.axis_size(conv_axis) or lrn_groups == 1:
        raise ValueError(f"split='columns' needs a two-column variant with its LRN within the "
                         f'columns and {self.model_axis!r} of size 2; got variant '
                         f'{self.variant!r}, lrn_within_columns={self.lrn_within_columns}')
      lrn_groups = 1
    split_channels = False  # whether x holds only this device's column of channels
    for spec in specs:
      x = ColumnConv(spec.features, spec.kernel, spec.stride, spec.padding, spec.columns,
                     kernels=self.kernels, kernel_init=w_init,
                     bias_init=b_init(spec.bias_one), dtype=dtype, axis=conv_axis,
                     gather_input=split_channels and spec.columns == 1, name=spec.name)(x)
      split_channels = conv_axis is not None
      x = act(x)
      self.sow('intermediates', spec.name + '_out', x)
      if spec.lrn and self.lrn:
        x = local_response_norm(x, k=self.lrn_k, n=self.lrn_n, alpha=self.lrn_alpha,
                                beta=self.lrn_beta, alpha_convention=self.lrn_alpha_convention,
                                impl=self.kernels.lrn_impl, groups=lrn_groups)
      if spec.pool:
        x = ops.max_pool(x, window, stride, impl=self.kernels.pool_impl)
        self.sow('intermediates', 'pool' + spec.name[-1], x)

    if self.variant == 'owt':
      x = adaptive_avg_pool(x, 6)
    width = fc_width(self.variant)
    drop = lambda h: nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    for name in ('fc6', 'fc7'):
      if self.variant == 'owt':  # torchvision drops the inputs of fc6 and fc7.
        x = drop(x)
      # Gathered after the dropout: one mask per unit, as on one device. 'fc' gathers the
      # images of every device before fc6: each computes its neurons for all of them.
      gather = 'features' if split_channels else ('batch' if fc_axis else None)
      x = act(Dense(width, axis=fc_axis, gather=gather, dtype=dtype, kernel_init=w_init,
                    bias_init=b_init(True), name=name)(x))
      split_channels = fc_axis is not None
      self.sow('intermediates', name + '_out', x)
      if self.variant != 'owt':  # §4.2: dropout on the outputs of the first two FC layers.
        x = drop(x)
    x = Dense(self.num_classes, axis=fc_axis, split='inputs', dtype=dtype, kernel_init=w_init,
              bias_init=b_init(False), name='fc8')(x)
    return x.astype(jnp.float32)


# AlexNet's fields that are not config fields of the same name: the network's variant is
# config.model; the kernels and the split come from the run's devices, not from the config.
_FIELD_IN_CONFIG = {'variant': 'model'}
_NOT_FROM_CONFIG = ('kernels', 'split', 'model_axis', 'input_std', 'parent', 'name')


def create_model(config: Any, kernels: Kernels | None = None, split: str = 'none') -> AlexNet:
  """The AlexNet that `config` (a validated ConfigDict) describes: every field of AlexNet from
  the config field of the same name (`variant` from config.model), computed with `kernels`
  (default: `kernels.resolve(config)` for JAX's default devices); `split` as in AlexNet."""
  if kernels is None:
    kernels = kernels_lib.resolve(config)
  fields = {f.name: config[_FIELD_IN_CONFIG.get(f.name, f.name)]
            for f in dataclasses.fields(AlexNet) if f.init and f.name not in _NOT_FROM_CONFIG}
  return AlexNet(
      **fields, kernels=kernels, split=split,
      # A tuple: the module is hashed as a static argument of jit (config.json gives a list).
      input_std=None if config.get('std_rgb') is None else tuple(map(float, config.std_rgb)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(model: AlexNet, rng: jax.Array, image_size: int) -> Any:
  """Initial parameters (§5 scheme) for images of `image_size` x `image_size` x 3.

  One jitted program, kept for each (model, image_size): the forward pass that `init` traces is
  dropped, the draws are not compiled one operation at a time (op by op, the paper network's
  took seconds), and a second run in the same process (a sweep) neither traces nor compiles it
  again."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init({'params': rng}, x, train=False)['params']


def fc7_features(model: AlexNet, params: Any, images: jax.Array) -> jax.Array:
  """The 4096-d last-hidden-layer activations (after ReLU) that §6.1 compares by distance."""
  _, state = model.apply({'params': params}, images, train=False, mutable=['intermediates'])
  return state['intermediates']['fc7_out'][0]


def intermediate_shapes(model: AlexNet, image_size: int, batch: int = 1) -> dict[str, tuple]:
  """Shape of every stage's output, computed abstractly (no FLOPs spent)."""
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)

  def f(x):
    params = model.init({'params': jax.random.key(0)}, x, train=False)['params']
    _, state = model.apply({'params': params}, x, train=False, mutable=['intermediates'])
    return state['intermediates']

  shapes = jax.eval_shape(f, x)
  return {k: tuple(v[0].shape) for k, v in shapes.items()}


def count_params(params: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


__all__: Sequence[str] = (
    'AlexNet', 'LocalResponseNorm', 'local_response_norm', 'ColumnConv', 'Dense', 'create_model',
    'init_params', 'fc7_features', 'intermediate_shapes', 'count_params', 'conv_specs')
