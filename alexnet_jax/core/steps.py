"""The training and evaluation steps: pure functions, written once for every parallel strategy.

One SGD step of §5 is two parts:
- `grads_and_metrics`, what each device computes on its own: the uint8 patches finished into
  images, its dropout keys, the forward and backward pass over the layers it holds, the loss of
  the rows it answers for, the gradient sums over the devices that share a parameter, and the
  metrics;
- `apply_gradients`, the optimizer update (§5's momentum and weight decay, or LARS), on whole
  parameters, so that norms over a parameter (LARS, the gradient norm) are the whole one's.
`train_step` composes them. `parallel.py` wraps it for each strategy: under `jax.pmap` ('data':
every device holds the whole network, so both parts run on each device) or with
`grads_and_metrics` in `jax.shard_map` over a (data, model) mesh and the update under `jax.jit`
on the global arrays ('columns', 'hybrid': a device holds its slices of some layers).

The loss: each device takes the mean cross-entropy of the rows of the global batch that it alone
answers for, divided by the number of devices N; summed over all devices that is the mean over
the global batch. Inside shard_map and pmap JAX transposes each collective of the forward pass
(a gather into a reduce-scatter, a sum into a sum), so a device's gradient is already that of
its whole model group's loss; what remains is a sum over the axes along which a parameter is
replicated (every axis for the data strategy: `lax.psum` of loss / N is the mean gradient).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import models
from alexnet_jax.core import optim
from alexnet_jax.core.kernels import Kernels

# The device axes: the data axis splits the batch (every strategy), the model axis splits
# layers within a group of devices ('columns', 'hybrid').
DATA, MODEL = 'data', 'model'


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32) of the run's base key; per-step keys are folded in.


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       image_size: int, params: Any = None) -> TrainState:
  """Initial state: §5's initialisation from `seed` (or the given `params`), fresh optimizer
  state, step 0."""
  init_key, base_key = jax.random.split(jax.random.key(seed))
  if params is None:
    params = models.init_params(model, init_key, image_size)
  # Jitted: unjitted, optax's init compiles a small program per parameter array (about 2 s for
  # 'owt', at every start and every restore).
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=jax.jit(tx.init)(params), rng=jax.random.key_data(base_key))


def initial_state(config: Any, kernels: Kernels | None = None, *, abstract: bool = False
                  ) -> tuple[models.AlexNet, optax.GradientTransformation, TrainState]:
  """The model, optimizer and initial state of a run of `config`: host NumPy arrays, what
  training starts from. abstract=True: the state's shapes and dtypes only
  (jax.ShapeDtypeStruct), nothing drawn or computed: what a checkpoint is restored into (the
  paper network's initialisation is 61 M random draws)."""
  model = models.create_model(config, kernels)
  tx = optim.create_optimizer(config)
  start = lambda: create_train_state(model, tx, config.seed, config.image_size)
  if abstract:
    return model, tx, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                             jax.eval_shape(start))
  return model, tx, jax.tree_util.tree_map(np.asarray, start())


@dataclasses.dataclass(frozen=True)
class Axes:
  """The device axes a per-device step runs over.

  names: every axis, outermost first ((DATA,) under pmap; (DATA, MODEL) on a mesh).
  model: the axis whose devices share one copy of the network (None: each holds all of it).
  shared_rows: the devices of a model group hold the same rows of the batch ('columns': both
    columns see the pair's images), rather than each its own ('hybrid').
  """
  names: tuple[str, ...] = (DATA,)
  model: str | None = None
  shared_rows: bool = False

  def device_index(self) -> jax.Array:
    """This device's index over all the axes (row-major): its dropout stream."""
    index = 0
    for name in self.names:
      index = index * lax.axis_size(name) + lax.axis_index(name)
    return index

  def num_devices(self) -> int:
    return int(np.prod([lax.axis_size(name) for name in self.names]))

  def own_rows(self, x: jax.Array) -> jax.Array:
    """This device's share of rows that its whole model group computed (the identity without
    a model axis)."""
    if self.model is None:
      return x
    rows = x.shape[0] // lax.axis_size(self.model)
    return lax.dynamic_slice_in_dim(x, lax.axis_index(self.model) * rows, rows)

  def replicated(self, spec: P | None) -> tuple[str, ...]:
    """The axes along which a parameter laid out as `spec` has copies (None: every axis)."""
    return tuple(a for a in self.names if spec is None or a not in spec)


def _finished(batch: dict[str, jax.Array], finish: Callable | None) -> dict[str, jax.Array]:
  if finish is not None:
    return finish(batch)
  if batch['image'].dtype == jnp.uint8:  # (at trace time) never feed raw pixels to the network
    raise ValueError('uint8 patches reached the step without `finish` '
                     '(data.on_device.finisher): build the step with it.')
  return batch


def grads_and_metrics(params: Any, batch: dict[str, jax.Array], rng: jax.Array, step: jax.Array,
                      stop: jax.Array, *, model: nn.Module, axes: Axes, specs: Any = None,
                      finish: Callable | None = None
                      ) -> tuple[Any, dict[str, jax.Array], jax.Array]:
  """One device's part of a training step: (gradients, metrics, stop votes).

  Runs on one device's slice of everything, under pmap or shard_map over `axes`. `params` are
  the layers this device holds (`model` computes with them and exchanges activations over
  axes.model where it splits a layer); `specs` their PartitionSpecs (None: whole on every
  device). Every device draws its own dropout masks: the key is folded with the step and the
  device's index. `finish` (`data.on_device.finisher`) turns uint8 patches into the network's
  float images. The gradients returned are those of the global batch's mean loss; the metrics
  are global means; the votes count the devices whose process wishes to stop (`stop`, 0 or 1 on
  each device), so every process reads the same votes.
  """
  batch = _finished(batch, finish)
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  dropout_key = jax.random.fold_in(key, axes.device_index())
  labels = axes.own_rows(batch['label']) if axes.shared_rows else batch['label']
  n = axes.num_devices()

  def loss_fn(p):
    logits = axes.own_rows(model.apply({'params': p}, batch['image'], train=True,
                                       rngs={'dropout': dropout_key}))
    loss = jnp.mean(metrics_lib.cross_entropy(logits, labels))
    return loss / n, (loss, logits)

  (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if specs is None:
    grads = lax.psum(grads, axes.replicated(None))
  else:
    grads = jax.tree_util.tree_map(lambda g, s: lax.psum(g, axes.replicated(s)), grads, specs,
                                   is_leaf=lambda x: isinstance(x, P))
  step_metrics = {
      'train/loss': loss,
      'train/top1_error': jnp.mean(metrics_lib.topk_errors(logits, labels, 1)),
      'train/top5_error': jnp.mean(metrics_lib.topk_errors(
          logits, labels, min(5, logits.shape[-1]))),
  }
  return grads, lax.pmean(step_metrics, axes.names), lax.psum(jnp.sum(stop), axes.names)


def apply_gradients(state: TrainState, grads: Any, learning_rate: jax.Array,
                    tx: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
  """The optimizer update of whole parameters with `learning_rate`: (next state, the gradient's
  global norm)."""
  opt_state = optim.with_learning_rate(state.opt_state, learning_rate)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          optax.tree.norm(grads))


def train_step(state: TrainState, batch: dict[str, jax.Array], learning_rate: jax.Array,
               stop: jax.Array, *, tx: optax.GradientTransformation, grads_fn: Callable
               ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
  """One SGD step: (state, metrics, stop votes). `grads_fn` is `grads_and_metrics` with its
  model and axes bound, as the strategy runs it (per device, or shard_mapped)."""
  grads, step_metrics, votes = grads_fn(state.params, batch, state.rng, state.step, stop)
  state, grad_norm = apply_gradients(state, grads, learning_rate, tx)
  return state, dict(step_metrics, **{'train/grad_norm': grad_norm}), votes


def probabilities(params: Any, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Softmax outputs; for [B, 10, H, W, 3] the average over the ten patches (§4.1)."""
  if images.ndim == 5:
    b, crops = images.shape[:2]
    logits = model.apply({'params': params}, images.reshape((b * crops,) + images.shape[2:]))
    return jnp.mean(jax.nn.softmax(logits).reshape(b, crops, -1), axis=1)
  return jax.nn.softmax(model.apply({'params': params}, images))


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              finish: Callable | None = None, axis: str = DATA) -> dict[str, jax.Array]:
  """`metrics.error_sums` of one device's batch, summed over `axis`: the whole network on every
  device, in every strategy (evaluation has no gradients to exchange).

  A batch of shape [B, 10, H, W, 3] is the paper's 10-crop test (§4.1): the softmax outputs of
  the ten patches are averaged before the errors are counted. `finish` as in
  `grads_and_metrics`.
  """
  batch = _finished(batch, finish)
  probs = probabilities(params, batch['image'], model=model)
  return lax.psum(metrics_lib.error_sums(probs, batch['label'], batch['mask']), axis)
