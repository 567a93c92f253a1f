"""A run's directory: what training writes there, and the one way to open a finished run.

A workdir holds config.json (the config, and the kernels the run resolved), classes.json (class
name -> label), data_stats.npz (the mean it subtracts, unless config.stats_file names one),
checkpoints/, metrics.jsonl and tensorboard/. The training loop writes them; `open_run` reads
them and writes nothing, for every command that uses a trained network (evaluate, predict,
figures, `main.py --mode=eval`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections
import numpy as np

from alexnet_jax import paths
from alexnet_jax.core import checkpoints
from alexnet_jax.core import config as config_lib
from alexnet_jax.core import optim
from alexnet_jax.core import steps
from alexnet_jax.core.kernels import Kernels
from alexnet_jax.errors import DataError
from alexnet_jax.errors import RunError

CONFIG_FILENAME = 'config.json'
CLASSES_FILENAME = 'classes.json'  # class name -> label


# ---------------------------------------------------------------------------- training writes


def write_config(workdir: str, config: ml_collections.ConfigDict, kernels: Kernels) -> None:
  """config.json: the config's fields and the kernels the run resolved."""
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


# ---------------------------------------------------------------------------- reading a run


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved (config.json), merged over the values older versions implied."""
  return _read_config(workdir)[0]


def _read_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  workdir = paths.resolve(workdir)
  if not workdir.is_dir():
    raise RunError(f'{workdir} is not a directory: pass the workdir of a trained run '
                   '(`python main.py --config=... --workdir=...` makes one).')
  path = workdir / CONFIG_FILENAME
  if not path.exists():
    raise RunError(f'{path} does not exist: {workdir} is not the workdir of a run (train one '
                   'with `python main.py --config=... --workdir=...`).')
  return config_lib.from_json(path.read_text(encoding='utf-8'), str(path))


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
    """What the run subtracts from every square image (§2), from its saved statistics."""
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
  config, records = _read_config(workdir)
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
    model, _, state = steps.initial_state(config, kernels)
    schedule = optim.LearningRate(config, 1).state()
    state, _, _ = checkpoints.restore(manager, state, schedule, step=step)
  finally:
    manager.close()
  return Restored(model=model, params=state.params, step=int(step))
