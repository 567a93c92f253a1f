"""Parallelism strategies: where the network, its parameters and the batch live on the devices.

  'data'     every device holds the whole network and a slice of the batch; gradients are
             averaged over the devices (jax.pmap). The default.
  'columns'  the paper's own split (§3.2): a device mesh (data, model) with model = 2. The two
             devices of a model pair each hold one column's kernels of conv1-conv5 and half of
             each fully connected layer, and share their data group's images; they exchange
             activations only at conv3's input and at the fully connected layers. The data
             axis replicates the pairs over the rest of the devices.
  'hybrid'   Krizhevsky's "one weird trick" (2014): the convolutional layers data-parallel over
             every device, the fully connected layers split over the model axis (by default
             all the devices of one host): before fc6 the devices of a model group gather their
             images' conv features, each computes its slice of fc6-fc8 for all of them, and the
             gradients flow back the same way.

Every strategy trains with the one step of `steps.py`: 'data' maps `steps.train_step` over the
devices with `jax.pmap`; 'columns' and 'hybrid' run `steps.grads_and_metrics` in `jax.shard_map`
over their mesh (models.AlexNet's `split`: every exchange is a JAX collective there) and the
optimizer update on the global arrays under `jax.jit`. The parameters keep the layout of the
one-device network, only sharded (`param_specs`): checkpoints, evaluation and weights are the
same in every strategy.

Across hosts (several processes, `alexnet_jax/distributed.py`) the mesh keeps each model group inside one
host, where the links are fast, and lets the data axis span the hosts: a host's devices hold
whole data groups, so every process holds a whole copy of the parameters (`Placement.host_state`
reads it without communication) and feeds its own rows of each global batch.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax.core import models
from alexnet_jax.core import steps
from alexnet_jax.config import STRATEGIES
from alexnet_jax.core.steps import DATA
from alexnet_jax.core.steps import MODEL
from alexnet_jax.errors import ConfigError

_SPLIT = {'columns': 'columns', 'hybrid': 'fc'}


def model_axis_size(strategy: str, devices_per_host: int, model_parallel: int = 0) -> int:
  """Devices that share one copy of the network: 1 for 'data', 2 for 'columns' (the paper's two
  columns), `model_parallel` or else all of one host's devices for 'hybrid'."""
  if strategy == 'data':
    return 1
  if strategy == 'columns':
    return 2
  if strategy == 'hybrid':
    return model_parallel or devices_per_host
  raise ConfigError(f'config.parallelism={strategy!r}: must be one of {STRATEGIES}')


def check(config: Any, num_devices: int, devices_per_host: int | None = None) -> None:
  """ConfigError, naming the field and the numbers, when `config`'s strategy cannot be laid out
  on `num_devices` devices, `devices_per_host` of them in each process (default: all in one)."""
  strategy = config.parallelism
  per_host = devices_per_host or num_devices
  m = model_axis_size(strategy, per_host, config.model_parallel)
  if strategy == 'data':
    if config.model_parallel not in (0, 1):
      raise ConfigError(f'config.model_parallel={config.model_parallel}: the data strategy '
                        'splits no layer (use --config.parallelism=hybrid)')
    return
  hosts = num_devices // per_host
  why = None
  if strategy == 'columns' and config.model_parallel not in (0, 2):
    why = f'has a model axis of 2 (the two columns), not model_parallel={config.model_parallel}'
  elif m > per_host and hosts > 1:
    why = (f'keeps its model axis ({m} devices) within one host, and each of the {hosts} '
           f'processes has {per_host} devices')
  elif per_host % m:
    why = (f'needs a multiple of {m} devices, and {per_host} are here' if hosts == 1 else
           f'needs a multiple of {m} devices on each host, and each of the {hosts} processes '
           f'has {per_host}')
  elif config.batch_size % num_devices:
    why = f'needs batch_size ({config.batch_size}) to split over the {num_devices} devices'
  elif strategy == 'columns' and (models.conv_specs(config.model)[1].columns != 2
                                  or not config.lrn_within_columns):
    why = ("splits the paper's two columns: it needs config.model 'paper' or 'small' and "
           f'lrn_within_columns=True (got {config.model!r}, {config.lrn_within_columns})')
  elif models.fc_width(config.model) % m:
    why = (f'cannot split the fully connected layers ({models.fc_width(config.model)} neurons) '
           f'over {m} devices')
  if why:
    raise ConfigError(f'config.parallelism={strategy!r} {why}.')


def _by_host(devices: list) -> list:
  """`devices` in (process, id) order: each host's devices adjacent, hosts in process order."""
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def devices_per_host(devices: list) -> int:
  """How many of `devices` each host holds (checked equal: a mesh needs as many per host)."""
  counts = collections.Counter(d.process_index for d in devices)
  if len(set(counts.values())) > 1:
    raise ConfigError(f'The processes hold different numbers of the devices ({dict(counts)}); '
                      'every host must bring as many.')
  return next(iter(counts.values()))


def create_mesh(strategy: str, devices: list, model_parallel: int = 0,
                per_host: int | None = None) -> Mesh:
  """The (data, model) mesh of `strategy` over `devices`: model-axis neighbours adjacent and on
  one host, the data axis over hosts in process order (each host's rows of the global batch).

  `per_host` (default: as the processes hold them) groups consecutive devices into hosts: a
  projection lays one process's devices out as the hosts of a larger machine.
  """
  devices = _by_host(devices)
  m = model_axis_size(strategy, per_host or devices_per_host(devices), model_parallel)
  return Mesh(np.array(devices).reshape(len(devices) // m, m), (DATA, MODEL))


def param_specs(params: Any, strategy: str) -> Any:
  """The PartitionSpec of every parameter (the one-device layout, sharded over MODEL)."""

  def spec(path, leaf):
    layer, kind = path[0].key, path[-1].key
    if strategy == 'data':
      return P()
    if layer == 'fc8':  # rows of the kernel; the bias is added whole after the sum.
      return P(MODEL, None) if kind == 'kernel' else P()
    if layer.startswith('fc') or strategy == 'columns':  # output neurons (last axis)
      return P(*([None] * (leaf.ndim - 1) + [MODEL]))
    return P()  # 'hybrid' convolutional layers: whole on every device.

  return jax.tree_util.tree_map_with_path(spec, params)


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


# ----------------------------------------------------------------- the step of each strategy


def pmapped_train_step(model: models.AlexNet, tx: optax.GradientTransformation,
                       devices: list | None = None, finish: Callable | None = None) -> Callable:
  """'data': `steps.train_step` mapped over `devices` (default: every device of every process);
  the state is donated.

  (state, batch, learning_rate, stop) -> (state, metrics, stop_votes), with the state, batch
  and `stop` (one vote per local device, `Placement.stop_votes`) carrying a leading axis of
  local devices.
  """
  grads_fn = functools.partial(steps.grads_and_metrics, model=model, axes=steps.Axes(),
                               finish=finish)
  return jax.pmap(functools.partial(steps.train_step, tx=tx, grads_fn=grads_fn),
                  axis_name=DATA, in_axes=(0, 0, None, 0), donate_argnums=(0,),
                  devices=devices)


def mesh_train_step(model: models.AlexNet, tx: optax.GradientTransformation, strategy: str,
                    shardings: Any, finish: Callable | None = None) -> Callable:
  """'columns' or 'hybrid': `steps.train_step` jitted over the mesh of `shardings` (the state's,
  `state_shardings`), its per-device part in shard_map with `model` split for `strategy`;
  (state, batch, learning_rate, stop) -> (state, metrics, stop_votes) as `pmapped_train_step`,
  with global arrays. The state is donated."""
  mesh = shardings.step.mesh
  specs = jax.tree_util.tree_map(lambda s: s.spec, shardings.params)
  local = functools.partial(
      steps.grads_and_metrics, model=model.clone(split=_SPLIT[strategy]),
      axes=steps.Axes((DATA, MODEL), model=MODEL, shared_rows=strategy == 'columns'),
      specs=specs, finish=finish)
  rows, every_device = batch_spec(strategy), P((DATA, MODEL))

  def grads_fn(params, batch, rng, step, stop):  # every key of the batch is split by rows
    return jax.shard_map(local, mesh=mesh,
                         in_specs=(specs, {k: rows for k in batch}, P(), P(), every_device),
                         out_specs=(specs, P(), P()), check_vma=False)(
                             params, batch, rng, step, stop)

  replicated = NamedSharding(mesh, P())
  return jax.jit(functools.partial(steps.train_step, tx=tx, grads_fn=grads_fn),
                 in_shardings=(shardings, NamedSharding(mesh, rows), replicated,
                               NamedSharding(mesh, every_device)),
                 out_shardings=(shardings, replicated, replicated), donate_argnums=(0,))


def pmapped_eval_step(model: models.AlexNet, devices: list | None = None,
                      finish: Callable | None = None) -> Callable:
  """`steps.eval_step` mapped over `devices` (default: every device): the evaluation of every
  strategy."""
  return jax.pmap(functools.partial(steps.eval_step, model=model, finish=finish),
                  axis_name=DATA, devices=devices)


def pmapped_probabilities(model: models.AlexNet, devices: list | None = None) -> Callable:
  """`steps.probabilities` mapped over `devices` (default: every device): (params, images) ->
  [local devices, b, classes]."""
  return jax.pmap(functools.partial(steps.probabilities, model=model), axis_name=DATA,
                  devices=devices)


# ------------------------------------------------------------------ placing arrays on devices


def device_axis_sharding(devices: list) -> NamedSharding:
  """Arrays [len(devices), ...] with row i on devices[i]: what pmap takes without a copy."""
  return NamedSharding(Mesh(np.array(devices), (DATA,)), P(DATA))


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


def local_copy(x: jax.Array) -> np.ndarray:
  """The whole of a global array, from this process's shards alone, as host NumPy.

  Every process holds every part of the parameters (the model axis stays within a host), so no
  data crosses hosts; a part missing here is a layout this module never makes (ValueError).
  """
  if x.is_fully_addressable:
    return np.asarray(x)
  out = np.empty(x.shape, x.dtype)
  seen, covered = set(), 0
  for s in x.addressable_shards:
    key = tuple((i.start, i.stop) for i in s.index)
    if key not in seen:
      seen.add(key)
      out[s.index] = np.asarray(s.data)
      covered += s.data.size
  if covered != x.size:
    raise ValueError(f'this process holds {covered} of the {x.size} values of an array '
                     f'sharded as {x.sharding}')
  return out


def device_batches(host_batches: Iterable[dict[str, np.ndarray]], ahead: int,
                   put: Callable[[dict[str, np.ndarray]], Any]) -> Iterator[Any]:
  """Host batches, each placed by `put` `ahead` batches before the step that uses them.

  `jax.device_put` returns at once and copies in the background, so while the device runs step
  t the next `ahead` batches travel to it; the step then never waits for a host-to-device copy
  unless the input pipeline itself is slower. ahead=0 places each batch when it is asked for.
  """
  queue = collections.deque()
  for batch in host_batches:
    queue.append(put(batch))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ------------------------------------------------------------------ what the training loop uses


class Placement:
  """How a run's state and batches live on the devices, for its strategy: what `train.py`
  needs and nothing more.

  `devices` (default: every device of every process) are the run's; this process feeds and
  reads its own among them. `per_host` (default: as the processes hold them) is for
  projections only (`create_mesh`).
  """

  def __init__(self, config: Any, model: models.AlexNet, tx: optax.GradientTransformation,
               host_state: Any, devices: list | None = None, finish: Callable | None = None,
               per_host: int | None = None):
    self.strategy = config.parallelism
    self.devices = _by_host(devices or jax.devices())
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.per_host = per_host or devices_per_host(self.devices)
    check(config, len(self.devices), self.per_host)
    if self.strategy == 'data':
      self.mesh = None
      self.train_step = pmapped_train_step(model, tx, self.devices, finish)
      return
    self.mesh = create_mesh(self.strategy, self.devices, config.model_parallel, self.per_host)
    self.shardings = state_shardings(host_state, tx, self.mesh, self.strategy)
    self.batch_sharding = NamedSharding(self.mesh, batch_spec(self.strategy))
    self.votes_sharding = NamedSharding(self.mesh, P((DATA, MODEL)))
    self.train_step = mesh_train_step(model, tx, self.strategy, self.shardings, finish)

  def put_state(self, host_state: Any) -> Any:
    """Host state (the same on every process) -> the device state the train step takes."""
    if self.mesh is None:
      return replicate(host_state, self.local_devices)
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
        host_state, self.shardings)

  def host_state(self, state: Any) -> Any:
    """Device state -> host NumPy arrays in the one-device layout (checkpoints)."""
    if self.mesh is None:
      return unreplicate(state)
    return jax.tree_util.tree_map(local_copy, state)

  def eval_params(self, state: Any) -> Any:
    """The parameters as `pmapped_eval_step` takes them (evaluation is data-parallel in every
    strategy: it has no gradients to exchange)."""
    if self.mesh is None:
      return state.params
    return replicate(self.host_state(state).params, jax.local_devices())

  def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
    """This process's rows of a global batch -> the batch the train step takes."""
    if self.mesh is None:
      return jax.device_put(shard(batch, len(self.local_devices)),
                            device_axis_sharding(self.local_devices))
    processes = len(self.devices) // len(self.local_devices)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            self.batch_sharding, x, (x.shape[0] * processes,) + x.shape[1:]), batch)

  def batches(self, host_batches: Iterable[dict[str, np.ndarray]], ahead: int
              ) -> Iterator[Any]:
    """Host batches placed on the devices `ahead` steps early (`device_batches`)."""
    return device_batches(host_batches, ahead, self.put_batch)

  def stop_votes(self, wish: bool) -> Any:
    """This process's wish to stop, one vote per local device, as the train step takes it."""
    votes = np.full(len(self.local_devices), int(wish), np.int32)
    if self.mesh is None:
      return votes
    return jax.make_array_from_process_local_data(self.votes_sharding, votes,
                                                  (len(self.devices),))


def first_value(x: jax.Array) -> np.ndarray:
  """A replicated (jit) or per-device (pmap) metric's value, as host NumPy."""
  return np.asarray(x.addressable_shards[0].data).reshape(-1)[0]


__all__ = ('STRATEGIES', 'Placement', 'check', 'create_mesh', 'param_specs', 'batch_spec',
           'mesh_train_step', 'pmapped_train_step', 'pmapped_eval_step',
           'pmapped_probabilities', 'state_shardings', 'model_axis_size', 'first_value',
           'replicate', 'unreplicate', 'shard', 'local_copy', 'device_batches',
           'devices_per_host')
