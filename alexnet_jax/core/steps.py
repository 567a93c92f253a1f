"""The training and evaluation steps: pure per-device functions, mapped over devices with pmap.

The paper split one network over two GPUs by its columns (§3.2); here every device holds the
whole network and a slice of the batch (data parallelism): gradients and metrics are averaged
over the device axis with `lax.pmean`, which equals the gradient of the mean loss over the global
batch when each device holds the same number of examples.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import models
from alexnet_jax.core import optim
from alexnet_jax.core.kernels import Kernels

AXIS = 'devices'


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32) of the run's base key; per-step keys are folded in.


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       image_size: int) -> TrainState:
  """Initial state: §5's initialisation from `seed`, fresh optimizer state, step 0."""
  init_key, base_key = jax.random.split(jax.random.key(seed))
  params = jax.jit(lambda k: models.init_params(model, k, image_size))(init_key)
  # Jitted: unjitted, optax's init compiles a small program per parameter array (about 2 s for
  # 'owt', at every start and every restore).
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=jax.jit(tx.init)(params), rng=jax.random.key_data(base_key))


def initial_state(config: Any, kernels: Kernels | None = None
                  ) -> tuple[models.AlexNet, optax.GradientTransformation, TrainState]:
  """The model, optimizer and initial state (host NumPy arrays) of a run of `config`: what
  training starts from, and the shapes a checkpoint is restored into."""
  model = models.create_model(config, kernels)
  tx = optim.create_optimizer(config)
  state = create_train_state(model, tx, config.seed, config.image_size)
  return model, tx, jax.tree_util.tree_map(np.asarray, state)


def _finished(batch: dict[str, jax.Array], finish: Callable | None) -> dict[str, jax.Array]:
  if finish is not None:
    return finish(batch)
  if batch['image'].dtype == jnp.uint8:  # (at trace time) never feed raw pixels to the network
    raise ValueError('uint8 patches reached the step without `finish` '
                     '(data.on_device.finisher): build the step with it.')
  return batch


def train_step(state: TrainState, batch: dict[str, jax.Array], learning_rate: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               finish: Callable | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on this device's slice of the batch; call under pmap(axis_name=AXIS).

  Every device draws its own dropout masks: the key is folded with the step and the device index.
  `finish` (`data.on_device.finisher`) turns uint8 patches into the network's float images.
  """
  batch = _finished(batch, finish)
  key = jax.random.wrap_key_data(state.rng)
  dropout_key = jax.random.fold_in(jax.random.fold_in(key, state.step), lax.axis_index(AXIS))

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': dropout_key})
    return jnp.mean(metrics_lib.cross_entropy(logits, batch['label'])), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, AXIS)
  opt_state = optim.with_learning_rate(state.opt_state, learning_rate)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step_metrics = {
      'train/loss': loss,
      'train/top1_error': jnp.mean(metrics_lib.topk_errors(logits, batch['label'], 1)),
      'train/top5_error': jnp.mean(metrics_lib.topk_errors(
          logits, batch['label'], min(5, logits.shape[-1]))),
      'train/grad_norm': optax.tree.norm(grads),
  }
  step_metrics = lax.pmean(step_metrics, AXIS)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), step_metrics


def probabilities(params: Any, images: jax.Array, *, model: nn.Module) -> jax.Array:
  """Softmax outputs; for [B, 10, H, W, 3] the average over the ten patches (§4.1)."""
  if images.ndim == 5:
    b, crops = images.shape[:2]
    logits = model.apply({'params': params}, images.reshape((b * crops,) + images.shape[2:]))
    return jnp.mean(jax.nn.softmax(logits).reshape(b, crops, -1), axis=1)
  return jax.nn.softmax(model.apply({'params': params}, images))


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              finish: Callable | None = None) -> dict[str, jax.Array]:
  """`metrics.error_sums` of a batch, summed over the devices; call under pmap(axis_name=AXIS).

  A batch of shape [B, 10, H, W, 3] is the paper's 10-crop test (§4.1): the softmax outputs of
  the ten patches are averaged before the errors are counted. `finish` as in `train_step`.
  """
  batch = _finished(batch, finish)
  probs = probabilities(params, batch['image'], model=model)
  return lax.psum(metrics_lib.error_sums(probs, batch['label'], batch['mask']), AXIS)


def pmapped_train_step(model: nn.Module, tx: optax.GradientTransformation,
                       devices: list | None = None, finish: Callable | None = None) -> Callable:
  """train_step mapped over `devices` (default: all local ones); the state is donated.

  (state, batch, learning_rate, stop) -> (state, metrics, stop_votes): `stop` is this process's
  wish to stop (0 or 1, from a signal), and `stop_votes` its sum over every device of every
  process. All processes read the same votes, so they agree on where to stop (`train.py`)
  through the step's own collective, with no extra synchronisation.
  """

  def step(state, batch, learning_rate, stop):
    state, step_metrics = train_step(state, batch, learning_rate, model=model, tx=tx,
                                     finish=finish)
    return state, step_metrics, lax.psum(stop, AXIS)

  return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None, None), donate_argnums=(0,),
                  devices=devices)


def pmapped_eval_step(model: nn.Module, devices: list | None = None,
                      finish: Callable | None = None) -> Callable:
  """eval_step mapped over `devices` (default: all local ones)."""
  return jax.pmap(lambda p, b: eval_step(p, b, model=model, finish=finish), axis_name=AXIS,
                  devices=devices)


def pmapped_probabilities(model: nn.Module, devices: list | None = None) -> Callable:
  """`probabilities` mapped over `devices` (default: all local ones): (params, images) ->
  [devices, b, classes]."""
  return jax.pmap(lambda p, x: probabilities(p, x, model=model), axis_name=AXIS,
                  devices=devices)


def device_axis_sharding(devices: list) -> jax.sharding.NamedSharding:
  """Arrays [len(devices), ...] with row i on devices[i]: what pmap takes without a copy."""
  return jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                    jax.sharding.PartitionSpec(AXIS))


def replicate(tree: Any, devices: list | None = None) -> Any:
  """Copies a pytree to every device (default: local ones), with a leading device axis."""
  devices = devices or jax.local_devices()
  sharding = device_axis_sharding(devices)
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated pytree, as host NumPy arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def shard(batch: dict[str, np.ndarray], n: int | None = None) -> dict[str, np.ndarray]:
  """Reshapes a host batch [B, ...] to [n, B/n, ...] for pmap (n: local devices by default)."""
  n = n or jax.local_device_count()

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f'a batch of {x.shape[0]} does not split over {n} local devices')
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree_util.tree_map(split, batch)


def device_batches(host_batches: Iterable[dict[str, np.ndarray]], ahead: int = 2,
                   devices: list | None = None, put: Callable | None = None
                   ) -> Iterator[dict[str, jax.Array]]:
  """Host batches [B, ...], `shard`ed and placed on `devices` (default: local ones) `ahead`
  batches before the step that uses them; or placed by `put` (a mesh strategy's sharding).

  `jax.device_put` returns at once and copies in the background, so while the device runs step
  t the next `ahead` batches travel to it; the step then never waits for a host-to-device copy
  unless the input pipeline itself is slower. ahead=0 places each batch when it is asked for.
  """
  if put is None:
    devices = devices or jax.local_devices()
    sharding = device_axis_sharding(devices)
    put = lambda batch: jax.device_put(shard(batch, len(devices)), sharding)
  queue = collections.deque()
  for batch in host_batches:
    queue.append(put(batch))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
