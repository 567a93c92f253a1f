"""A run's directory: what training writes there, and the one way to open a finished run.

A workdir holds config.json (the config, and the kernels the run resolved), classes.json (class
name -> label), data_stats.npz (the mean it subtracts, unless config.stats_file names one or
config.mean_rgb gives it), checkpoints/, metrics.jsonl and tensorboard/. The training loop
writes them (`python -m alexnet_jax.weights.import_weights` too, for weights trained elsewhere);
`open_run` reads them and writes nothing, for every command that uses a trained network
(evaluate, predict, figures, `main.py --mode=eval`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from alexnet_jax import config as config_lib
from alexnet_jax import paths
from alexnet_jax.core import checkpoints
from alexnet_jax.core import optim
from alexnet_jax.core import steps
from alexnet_jax.core.kernels import Kernels
from alexnet_jax.errors import DataError
from alexnet_jax.errors import RunError

CONFIG_FILENAME = config_lib.FILENAME
CLASSES_FILENAME = 'classes.json'  # class name -> label
CONFIG_CHANGES_FILENAME = 'config_changes.jsonl'  # what resumed runs changed, oldest first


# ---------------------------------------------------------------------------- training writes


def write_config(workdir: str, config: ml_collections.ConfigDict, kernels: Kernels,
                 changes: Sequence[ConfigChange] = ()) -> None:
  """config.json: the config's fields and the kernels the run resolved. `changes` from the
  config it replaces (`check_resume`) are appended to config_changes.jsonl first, so no
  value a checkpoint was trained with is lost."""
  if changes:
    path = paths.resolve(workdir) / CONFIG_CHANGES_FILENAME
    lines = path.read_text(encoding='utf-8') if path.exists() else ''
    lines += json.dumps({'time': time.time(), 'changes': {
        c.field: [c.before, c.after] for c in changes}}, default=str) + '\n'
    paths.write_atomic(path, lines)
  paths.write_atomic(paths.resolve(workdir) / CONFIG_FILENAME,
                     config_lib.to_json(config, resolved_kernels=kernels.as_dict()))


def record_classes(workdir: str, class_names: tuple[str, ...], is_writer: bool = True) -> None:
  """Saves class name -> label; refuses a workdir whose saved classes differ (the labels of
  its checkpoints would change meaning)."""
  path = paths.resolve(workdir) / CLASSES_FILENAME
  mapping = {name: label for label, name in enumerate(class_names)}
  if path.exists():
    if json.loads(path.read_text(encoding='utf-8')) != mapping:
      raise DataError(f'The classes of this dataset differ from {path}, which an earlier run '
                      'wrote: the labels would change meaning. Use a new workdir.')
  elif is_writer:
    paths.write_atomic(path, json.dumps(mapping, indent=0))


# Fields a resumed run may change without changing the training it continues: how long it runs,
# how often it logs, evaluates and saves, how it evaluates, and how the same values are computed
# and fed (kernels, parallel layout: checkpoints are saved in one layout for all). Accepted, and
# logged. Any other change, where the checkpoint's shapes still fit, is accepted with a warning:
# the run is then neither config's uninterrupted run (lowering the learning rate by hand, as
# the paper's authors did in §5, is such a change).
RESUME_SAFE_FIELDS = (
    'num_epochs', 'num_train_steps', 'num_eval_steps', 'eval_every_epochs', 'eval_every_steps',
    'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval_split',
    'eval_batch_size', 'ten_crop_eval', 'data_dir', 'cache', 'device_preprocessing',
    'device_prefetch', 'profile_steps', 'profile_after_steps', 'column_impl', 'pool_impl',
    'lrn_impl', 'conv_impl', 'conv_backend', 'parallelism', 'model_parallel', 'init_from')
# Fields that fix the data statistics (the mean image) saved with the run and its classes: a
# change would recompute them under the checkpoint's network. Refused, like other shapes.
RESUME_FIXED_FIELDS = ('dataset', 'train_split', 'num_classes', 'resize_size',
                       'resize_antialias', 'mean', 'stats_file', 'mean_rgb', 'std_rgb')


@dataclasses.dataclass(frozen=True)
class ConfigChange:
  field: str
  before: Any
  after: Any

  def __str__(self) -> str:
    return f'{self.field}: {self.before!r} -> {self.after!r}'


def _changes(before: ml_collections.ConfigDict,
             after: ml_collections.ConfigDict) -> list[ConfigChange]:
  """The fields whose values differ from `before` to `after`, in SCHEMA's order."""
  return [ConfigChange(name, before[name], after[name]) for name in config_lib.SCHEMA
          if before[name] != after[name]]


def _abstract_state(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of the TrainState a run of `config` checkpoints (nothing computed)."""
  # Kernels compute the same shapes: the plain forms.
  return steps.initial_state(config, Kernels(), abstract=True)[2]


def _first_shape_difference(before: Any, after: Any) -> str | None:
  """'path: what the checkpoint holds vs what the config builds' for the first leaf that
  differs in path, shape or dtype; None if the trees agree."""
  import jax  # pylint: disable=g-import-not-at-top
  flat = lambda tree: {jax.tree_util.keystr(k): (tuple(v.shape), str(v.dtype))
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  a, b = flat(before), flat(after)
  for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key):
      show = lambda v: 'nothing' if v is None else f'{v[1]}{list(v[0])}'
      return f'{key}: {show(a.get(key))} in the checkpoints, {show(b.get(key))} now'
  return None


def _shape_conflict(before: ml_collections.ConfigDict,
                    config: ml_collections.ConfigDict) -> str | None:
  """Why `config` cannot restore checkpoints written by a run of `before`, or None."""
  why = _first_shape_difference(_abstract_state(before), _abstract_state(config))
  return why and f'the checkpoints hold other shapes ({why})'


def check_resume(workdir: str, config: ml_collections.ConfigDict) -> list[ConfigChange]:
  """The changes from the config that wrote `workdir`'s checkpoints to `config`.

  Raises RunError, before anything is written, naming the differing fields, when `config`
  cannot continue those checkpoints: its TrainState has other shapes (model variant, number of
  classes, optimizer...) or it changes the data statistics (RESUME_FIXED_FIELDS). Returns []
  for a workdir without checkpoints. The caller logs the changes (RESUME_SAFE_FIELDS at INFO,
  the others as a warning).
  """
  path = paths.resolve(workdir) / CONFIG_FILENAME
  if not path.exists() or not checkpoints.complete_steps(checkpoints.checkpoint_dir(workdir)):
    return []
  before = read_config(workdir)
  changes = _changes(before, config)
  if not changes:
    return []
  listed = '; '.join(str(c) for c in changes if c.field not in RESUME_SAFE_FIELDS)
  fixed = [c.field for c in changes if c.field in RESUME_FIXED_FIELDS]
  why = (f'the fields {fixed} fix the classes and the data statistics the checkpoints were '
         'trained with' if fixed else None)
  if why is None and any(c.field not in RESUME_SAFE_FIELDS for c in changes):
    why = _shape_conflict(before, config)
  if why:
    raise RunError(
        f'Cannot resume the run in {workdir} with this config: {why}. It differs from the '
        f"run's config ({path}) in {listed}. Nothing was changed; use a new --workdir, or "
        "the run's values.")
  return changes


# ---------------------------------------------------------------------------- reading a run


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved (config.json), merged over the values older versions implied."""
  return config_lib.read_saved(workdir)[0]


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint's network: the model (with kernels for this machine), its parameters (host
  arrays) and the training step it was saved at."""
  model: Any
  params: Any
  step: int


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished (or running) run, opened read-only by `open_run`."""
  workdir: str
  config: ml_collections.ConfigDict
  resolved_kernels: dict[str, str] | None  # what training used (None: an older run)

  def class_names(self) -> list[str]:
    """Names of the labels 0..C-1, from classes.json."""
    path = paths.resolve(self.workdir) / CLASSES_FILENAME
    if not path.exists():
      raise RunError(f'{path} does not exist: the run in {self.workdir} never read its data. '
                     'Train it with `python main.py --config=... --workdir=...`.')
    mapping = json.loads(path.read_text(encoding='utf-8'))
    names = [''] * len(mapping)
    for name, label in mapping.items():
      names[int(label)] = name
    return names

  def mean(self) -> np.ndarray | None:
    """What the run subtracts from every square image (§2): config.mean_rgb, or the mean of
    its saved statistics."""
    from alexnet_jax.data import stats  # pylint: disable=g-import-not-at-top  (TensorFlow)
    return stats.mean_to_subtract(self.config, stats.saved_stats(self.config, self.workdir))

  def restore(self, which: str = 'best', step: int | None = None,
              config: ml_collections.ConfigDict | None = None,
              kernels: Kernels | None = None) -> Restored:
    """The checkpoint of `step`, or the best or the latest one.

    'best' is the checkpoint with the lowest validation top-1 error seen by the run (the latest
    when no evaluation has run yet). `config` (default: the run's own) builds the model;
    `kernels` default to what `kernels.resolve` picks for this machine.
    """
    return restore(self.workdir, config or self.config, which=which, step=step,
                   kernels=kernels)


def open_run(workdir: str) -> Run:
  """The run in `workdir`, read-only: config, class names, statistics and checkpoints."""
  workdir = str(paths.resolve(workdir))
  config, records = config_lib.read_saved(workdir)
  return Run(workdir=workdir, config=config, resolved_kernels=records.get('resolved_kernels'))


def restore(workdir: str, config: ml_collections.ConfigDict, *, which: str = 'best',
            step: int | None = None, kernels: Kernels | None = None) -> Restored:
  """See `Run.restore`; `config` describes the network of the checkpoint."""
  if which not in ('best', 'latest'):
    raise ValueError(f"which={which!r}: choose 'best' or 'latest'")
  directory = checkpoints.checkpoint_dir(workdir)
  if not paths.resolve(directory).is_dir():
    raise RunError(f'No checkpoints in {workdir}: train first with '
                   f'`python main.py --config=... --workdir={workdir}`')
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, read_only=True)
  try:
    latest = manager.latest_step()
    if latest is None:
      raise RunError(f'No checkpoint in {directory}: train first with '
                     f'`python main.py --config=... --workdir={workdir}`')
    if step is None:
      step = latest
      if which == 'best':
        best = checkpoints.restore_meta(manager, latest).get('best_step')
        step = best if best in manager.all_steps() else latest
    elif step not in manager.all_steps():
      raise RunError(f'No checkpoint of step {step} in {workdir}; there are '
                     f'{sorted(manager.all_steps())}')
    saved = paths.resolve(workdir) / CONFIG_FILENAME
    if saved.exists():
      before = read_config(workdir)
      why = _shape_conflict(before, config)
      if why:
        differ = '; '.join(str(c) for c in _changes(before, config))
        raise RunError(f'The config cannot read the checkpoints in {workdir}: {why}. It '
                       f"differs from the run's config ({saved}) in {differ}.")
    model, _, shapes = steps.initial_state(config, kernels, abstract=True)
    schedule = optim.LearningRate(config, 1).state()
    state, _, _ = checkpoints.restore(manager, shapes, schedule, step=step)
  finally:
    manager.close()
  return Restored(model=model, params=state.params, step=int(step))
