"""Parallelism strategies: where the network, its parameters and the batch live on the devices.

  'data'     every device holds the whole network and a slice of the batch; gradients are
             averaged over the devices (`steps.pmapped_train_step`, jax.pmap). The default.
  'columns'  the paper's own split (§3.2): a device mesh (data, model) with model = 2. The two
             devices of a model pair each hold one column's kernels of conv1-conv5 and half of
             each fully connected layer, and share their data group's images; they exchange
             activations only at conv3's input and at the fully connected layers. The data
             axis replicates the pairs over the rest of the devices.
  'hybrid'   Krizhevsky's "one weird trick" (2014): the convolutional layers data-parallel over
             every device, the fully connected layers split over the model axis (by default
             all the devices): before fc6 the devices of a model group gather their images'
             conv features, each computes its slice of fc6-fc8 for all of them, and the
             gradients flow back the same way.

'columns' and 'hybrid' run the forward and backward pass in `jax.shard_map` (models.AlexNet's
`split`: every exchange is a JAX collective there) and the optimizer update on the global
arrays under `jax.jit`, so that norms over a whole parameter (LARS, the gradient norm) are
the whole parameter's. The parameters keep the layout of the one-device network, only sharded
(`param_specs`): checkpoints, evaluation and weights are the same in every strategy.

The loss: each device takes the cross-entropy of its own 1/N of the global batch (the rows it
alone answers for), divided by N; the sum over all devices is then the mean over the batch.
Inside shard_map JAX transposes each collective (a gather into a reduce-scatter, a sum into a
sum), so a device's gradient is already that of its whole model group's loss; what remains is
a sum over the axes along which a parameter is replicated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import models
from alexnet_jax.core import optim
from alexnet_jax.core import steps
from alexnet_jax.core.config import STRATEGIES
from alexnet_jax.core.kernels import Kernels
from alexnet_jax.errors import ConfigError

DATA, MODEL = 'data', 'model'
_SPLIT = {'columns': 'columns', 'hybrid': 'fc'}


def model_axis_size(strategy: str, num_devices: int, model_parallel: int = 0) -> int:
  """Devices that share one copy of the network: 1 for 'data', 2 for 'columns' (the paper's two
  columns), `model_parallel` or else all `num_devices` for 'hybrid'."""
  if strategy == 'data':
    return 1
  if strategy == 'columns':
    return 2
  if strategy == 'hybrid':
    return model_parallel or num_devices
  raise ConfigError(f'config.parallelism={strategy!r}: must be one of {STRATEGIES}')


def check(config: Any, num_devices: int, num_processes: int = 1) -> None:
  """ConfigError, naming the field, when `config`'s strategy cannot run on `num_devices`."""
  strategy = config.parallelism
  m = model_axis_size(strategy, num_devices, config.model_parallel)
  if strategy == 'data':
    if config.model_parallel not in (0, 1):
      raise ConfigError(f'config.model_parallel={config.model_parallel}: the data strategy '
                        'splits no layer (use --config.parallelism=hybrid)')
    return
  why = None
  if num_processes > 1:
    why = ('runs in one process for now (one host with all its devices); use the data '
           'strategy across hosts')
  elif num_devices % m:
    why = f'needs a multiple of {m} devices, and {num_devices} are here'
  elif config.batch_size % num_devices:
    why = f'needs batch_size ({config.batch_size}) to split over the {num_devices} devices'
  elif strategy == 'columns' and (models.conv_specs(config.model)[1].columns != 2
                                  or not config.lrn_within_columns):
    why = ("splits the paper's two columns: it needs config.model 'paper' or 'small' and "
           f'lrn_within_columns=True (got {config.model!r}, {config.lrn_within_columns})')
  elif strategy == 'columns' and config.model_parallel not in (0, 2):
    why = f'has a model axis of 2 (the two columns), not model_parallel={config.model_parallel}'
  elif models.fc_width(config.model) % m:
    why = f'cannot split the fully connected layers over {m} devices'
  if why:
    raise ConfigError(f'config.parallelism={strategy!r} {why}.')


def create_mesh(strategy: str, devices: list, model_parallel: int = 0) -> Mesh:
  """The (data, model) mesh of `strategy` over `devices`; model-axis neighbours adjacent."""
  m = model_axis_size(strategy, len(devices), model_parallel)
  return Mesh(np.array(devices).reshape(len(devices) // m, m), (DATA, MODEL))


def param_specs(params: Any, strategy: str) -> Any:
  """The PartitionSpec of every parameter (the one-device layout, sharded over MODEL)."""

  def spec(path, leaf):
    layer, kind = path[0].key, path[-1].key
    if layer == 'fc8':  # rows of the kernel; the bias is added whole after the sum.
      return P(MODEL, None) if kind == 'kernel' else P()
    if layer.startswith('fc') or strategy == 'columns':  # output neurons (last axis)
      return P(*([None] * (leaf.ndim - 1) + [MODEL]))
    return P()  # 'hybrid' convolutional layers: whole on every device.

  return jax.tree_util.tree_map_with_path(spec, params)


def _replicated_axes(spec: P) -> tuple[str, ...]:
  return tuple(a for a in (DATA, MODEL) if a not in spec)


def batch_spec(strategy: str) -> P:
  """'columns': a data group's images on both devices of its pair; 'hybrid': each device its
  own images."""
  return P(DATA) if strategy == 'columns' else P((DATA, MODEL))


def state_shardings(state: steps.TrainState, tx: optax.GradientTransformation, mesh: Mesh,
                    strategy: str) -> Any:
  """NamedShardings for a TrainState: parameters and their optimizer slots as `param_specs`,
  everything else replicated."""
  specs = param_specs(state.params, strategy)
  opt_specs = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, specs,
                                    transform_non_params=lambda _: P(),
                                    is_leaf=lambda x: isinstance(x, P))
  tree = state.replace(step=P(), params=specs, opt_state=opt_specs, rng=P())
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), tree,
                                is_leaf=lambda x: isinstance(x, P))


def grads_and_metrics(model: models.AlexNet, strategy: str, mesh: Mesh, specs: Any,
                      finish: Callable | None = None) -> Callable:
  """(params, batch, rng, step) -> (grads, metrics): the shard_mapped forward and backward pass
  of `model` (its `split` set for `strategy`); gradients are those of the global batch's mean
  loss, sharded as `specs`; metrics are global means. `finish` (`data.on_device.finisher`)
  turns each device's uint8 rows into float images first."""
  n = mesh.devices.size

  def local(params, batch, rng, step):
    if finish is not None:
      batch = finish(batch)
    data_i, model_i = lax.axis_index(DATA), lax.axis_index(MODEL)
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    dropout_key = jax.random.fold_in(key, data_i * mesh.shape[MODEL] + model_i)
    labels = batch['label']

    def own_rows(x):  # This device's share of the rows its model group computed.
      rows = x.shape[0] // mesh.shape[MODEL]
      return lax.dynamic_slice_in_dim(x, model_i * rows, rows)

    if strategy == 'columns':
      labels = own_rows(labels)

    def loss_fn(p):
      logits = own_rows(model.apply({'params': p}, batch['image'], train=True,
                                    rngs={'dropout': dropout_key}))
      loss = jnp.mean(metrics_lib.cross_entropy(logits, labels))
      return loss / n, (loss, logits)

    (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = jax.tree_util.tree_map(lambda g, s: lax.psum(g, _replicated_axes(s)), grads, specs,
                                   is_leaf=lambda x: isinstance(x, P))
    step_metrics = {
        'train/loss': loss,
        'train/top1_error': jnp.mean(metrics_lib.topk_errors(logits, labels, 1)),
        'train/top5_error': jnp.mean(metrics_lib.topk_errors(
            logits, labels, min(5, logits.shape[-1]))),
    }
    return grads, lax.pmean(step_metrics, (DATA, MODEL))

  bspec = batch_spec(strategy)

  def grads(params, batch, rng, step):  # every key of the batch is split by rows
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, {k: bspec for k in batch}, P(), P()),
                         out_specs=(specs, P()), check_vma=False)(params, batch, rng, step)

  return grads


def mesh_train_step(config: Any, tx: optax.GradientTransformation, shardings: Any,
                    kernels: Kernels | None = None, finish: Callable | None = None) -> Callable:
  """The 'columns' or 'hybrid' training step, jitted over the mesh of `shardings` (the state's,
  `state_shardings`): (state, batch, learning_rate, stop) -> (state, metrics, stop) like
  `steps.pmapped_train_step`; the state is donated."""
  strategy = config.parallelism
  model = models.create_model(config, kernels, split=_SPLIT[strategy])
  mesh = shardings.step.mesh
  specs = jax.tree_util.tree_map(lambda s: s.spec, shardings.params)
  grads_fn = grads_and_metrics(model, strategy, mesh, specs, finish)

  def step(state, batch, learning_rate, stop):
    grads, step_metrics = grads_fn(state.params, batch, state.rng, state.step)
    opt_state = optim.with_learning_rate(state.opt_state, learning_rate)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics['train/grad_norm'] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), \
        step_metrics, stop

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, batch_spec(strategy))
  return jax.jit(step, in_shardings=(shardings, batch_sharding, replicated, replicated),
                 out_shardings=(shardings, replicated, replicated), donate_argnums=(0,))


# ------------------------------------------------------------------ what the training loop uses


class Placement:
  """How a run's state and batches live on the devices, for its strategy: what `train.py`
  needs and nothing more."""

  def __init__(self, config: Any, model: models.AlexNet, tx: optax.GradientTransformation,
               host_state: Any, kernels: Kernels | None = None, devices: list | None = None,
               finish: Callable | None = None):
    self.strategy = config.parallelism
    # This process's devices: pmap spans the other processes' through its collectives.
    self.devices = devices or jax.local_devices()
    check(config, len(self.devices), jax.process_count())
    if self.strategy == 'data':
      self.mesh = None
      self.train_step = steps.pmapped_train_step(model, tx, devices, finish)
      return
    self.mesh = create_mesh(self.strategy, self.devices, config.model_parallel)
    self.shardings = state_shardings(host_state, tx, self.mesh, self.strategy)
    self.batch_sharding = NamedSharding(self.mesh, batch_spec(self.strategy))
    self.train_step = mesh_train_step(config, tx, self.shardings, kernels, finish)

  def put_state(self, host_state: Any) -> Any:
    """Host state -> the device state the train step takes."""
    if self.mesh is None:
      return steps.replicate(host_state, self.devices)
    return jax.device_put(host_state, self.shardings)

  def host_state(self, state: Any) -> Any:
    """Device state -> host NumPy arrays in the one-device layout (checkpoints)."""
    if self.mesh is None:
      return steps.unreplicate(state)
    return jax.tree_util.tree_map(np.asarray, state)

  def eval_params(self, state: Any) -> Any:
    """The parameters as `steps.pmapped_eval_step` takes them (evaluation is data-parallel in
    every strategy: it has no gradients to exchange)."""
    if self.mesh is None:
      return state.params
    return steps.replicate(self.host_state(state).params, jax.local_devices())

  def batches(self, host_batches: Iterable[dict[str, np.ndarray]], ahead: int
              ) -> Iterator[Any]:
    """Host batches placed on the devices `ahead` steps early (`steps.device_batches`)."""
    if self.mesh is None:
      return steps.device_batches(host_batches, ahead, self.devices)
    return steps.device_batches(host_batches, ahead,
                                put=functools.partial(jax.device_put,
                                                      device=self.batch_sharding))


def first_value(x: jax.Array) -> np.ndarray:
  """A replicated (jit) or per-device (pmap) metric's value, as host NumPy."""
  return np.asarray(x.addressable_shards[0].data).reshape(-1)[0]


__all__ = ('STRATEGIES', 'Placement', 'check', 'create_mesh', 'param_specs', 'batch_spec',
           'mesh_train_step', 'grads_and_metrics', 'state_shardings', 'model_axis_size',
           'first_value')
