"""A new run started from another run's parameters: config.init_from (fine-tuning).

  python main.py --config=configs/torchvision.py --workdir=runs/flowers \
      --config.init_from=runs/torchvision --config.dataset=folder --config.data_dir=~/flowers \
      --config.num_classes=5 --config.freeze_through=conv5

The source is any run directory: one trained here, or one written by
`python -m alexnet_jax.weights.import_weights`. Its best checkpoint is read (the latest where no
evaluation has run). Layer by layer (conv1..fc8), a layer whose parameters all have the shapes of
the new run's is loaded; any other (fc8 when num_classes differs, every layer of another
variant) keeps §5's initialisation. The optimizer state starts afresh (zero momentum) and the
step at 0: a fine-tune is a new run, with its own schedule. Which layers were loaded and which
were not, and why, is logged; so is a source whose input preprocessing differs, since its
weights expect their own.

Only a new run reads the source: a workdir with a checkpoint resumes from it, and init_from is
then ignored (run.RESUME_SAFE_FIELDS).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections

from alexnet_jax import paths
from alexnet_jax.core import run as run_lib
from alexnet_jax.core.kernels import Kernels
from alexnet_jax.errors import RunError

# Fields that decide what the network's input is: weights trained with other values see other
# numbers than they learned on.
PREPROCESSING_FIELDS = ('mean', 'mean_rgb', 'std_rgb', 'resize_size', 'image_size',
                        'resize_antialias')


@dataclasses.dataclass(frozen=True)
class Transfer:
  """The new run's parameters and what they took from the source."""
  params: Any
  loaded: tuple[str, ...]  # layers whose parameters came from the source
  kept: dict[str, str]  # layer -> why it keeps its initialisation


def _shapes(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)


def merge(initial: Any, source: Any) -> Transfer:
  """`initial` (the new run's initial parameters, layer -> arrays) with each layer replaced by
  `source`'s where the layer's parameters have the same names and shapes."""
  params, loaded, kept = dict(initial), [], {}
  for layer, arrays in initial.items():
    if layer not in source:
      kept[layer] = 'not in the source'
    elif _shapes(source[layer]) != _shapes(arrays):
      kept[layer] = f'shapes differ: {_shapes(source[layer])} in the source, {_shapes(arrays)} here'
    else:
      params[layer] = jax.tree_util.tree_map(lambda s, a: s.astype(a.dtype), source[layer],
                                             arrays)
      loaded.append(layer)
  return Transfer(params=params, loaded=tuple(loaded), kept=kept)


@dataclasses.dataclass(frozen=True)
class Source:
  """The checkpoint a fine-tune starts from."""
  params: Any
  step: int
  workdir: str


def read_source(config: ml_collections.ConfigDict, workdir: str) -> Source:
  """config.init_from's best checkpoint (the latest where none was evaluated), read before the
  new run writes anything. RunError where it is not a run with a checkpoint, or is `workdir`
  itself. Warns where the source's input preprocessing differs from `config`'s."""
  where = str(paths.resolve(config.init_from))
  if where == str(paths.resolve(workdir)):
    raise RunError(f'config.init_from={config.init_from!r} is this run\'s own workdir: give '
                   'another run\'s, or leave init_from unset to resume.')
  try:
    run = run_lib.open_run(where)
    # Plain XLA kernels: only the parameters are wanted, and they are the same for every kernel.
    restored = run.restore(which='best', kernels=Kernels())
  except RunError as e:  # named as the field the user set
    raise RunError(f'config.init_from={config.init_from!r}: {e}') from None
  differ = [f'{f}={run.config[f]!r} there, {config[f]!r} here' for f in PREPROCESSING_FIELDS
            if run.config[f] != config[f]]
  if differ:
    logging.warning('The weights of %s were trained on other inputs than this run feeds them '
                    '(%s): fine-tuning adapts them, but set these fields as the source has them '
                    'unless that is intended.', where, '; '.join(differ))
  return Source(params=restored.params, step=restored.step, workdir=where)


def start_from(source: Source, initial: Any, frozen: tuple[str, ...] = ()) -> Transfer:
  """The parameters a new run starts from: `initial` (§5's initialisation) with the layers of
  `source` that fit (`merge`). Logs which were loaded and which not; RunError where none fits.
  `frozen` (the layers the run freezes) are checked: a frozen layer that was not loaded stays at
  its random initialisation, which is logged as a warning."""
  transfer = merge(initial, source.params)
  logging.info('Starting from the checkpoint of step %d of %s. Loaded: %s. Not loaded (§5\'s '
               'initialisation): %s', source.step, source.workdir,
               ', '.join(transfer.loaded) or 'no layer',
               '; '.join(f'{k} ({why})' for k, why in transfer.kept.items()) or 'none')
  if not transfer.loaded:
    raise RunError(f'config.init_from={source.workdir!r}: no layer of that run fits this '
                   f'network ({"; ".join(f"{k}: {w}" for k, w in transfer.kept.items())}). '
                   'Fine-tune from a run of the same model variant.')
  random_frozen = [layer for layer in frozen if layer in transfer.kept]
  if random_frozen:
    logging.warning('Frozen but not loaded, so they stay at their random initialisation: %s',
                    ', '.join(random_frozen))
  return transfer
