"""Weights trained elsewhere, written as a run that every command opens as if trained here.

  python -m alexnet_jax.weights.import_weights --format=torchvision \
      --file=alexnet-owt-7be5be79.pth --workdir=runs/torchvision [--config=configs/torchvision.py]

The workdir gets what training would have written (`alexnet_jax.core.run`): config.json (the
config, configs/torchvision.py by default: the 'owt' network with the preprocessing those
weights expect, num_classes read from the file), classes.json (ILSVRC-2012's WordNet ids in
torchvision's label order, from the list that tensorflow-datasets ships, when the file has 1000
classes; else the labels' numbers) and the checkpoint of step 0: the converted parameters in a
TrainState with a fresh optimizer state. No data statistics: the config gives its RGB mean.
Then evaluate, predict and figures read it like any run, e.g.

  python -m alexnet_jax.paper.predict --workdir=runs/torchvision image.jpg

A .pth file needs PyTorch (read with `torch.load(weights_only=True)`); a .safetensors file of the
same keys needs only the `safetensors` package. A workdir that holds checkpoints is refused.
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import dataclasses
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from alexnet_jax import cli
from alexnet_jax import config as config_lib
from alexnet_jax import paths
from alexnet_jax.core import checkpoints
from alexnet_jax.core import models
from alexnet_jax.core import optim
from alexnet_jax.core import run as run_lib
from alexnet_jax.core import steps
from alexnet_jax.core.kernels import Kernels
from alexnet_jax.errors import ConfigError
from alexnet_jax.errors import UserError
from alexnet_jax.weights import torchvision

FORMATS = ('torchvision',)
DEFAULT_CONFIGS = {'torchvision': 'torchvision.py'}  # in configs/
# Where tensorflow-datasets keeps ILSVRC-2012's 1000 WordNet ids, sorted: the label order of
# its imagenet2012 (what our runs on it record) and of torchvision's ImageNet weights. Older
# releases kept it at the second path.
_IMAGENET_LABELS = ('datasets/imagenet2012/labels.txt',
                    'image_classification/imagenet2012_labels.txt')
_IMAGENET_CLASSES = 1000
# Config fields that change torchvision's network, and the values it was trained with.
_NETWORK = {'model': 'owt', 'activation': 'relu', 'overlapping_pool': True}


@dataclasses.dataclass(frozen=True)
class Imported:
  """What `import_torchvision` wrote."""
  workdir: str
  num_classes: int
  num_params: int
  classes_source: str  # the label list's path, or 'indices'


def default_config(weights_format: str = 'torchvision') -> ml_collections.ConfigDict:
  """configs/<the format's config> of the source checkout this package runs from."""
  name = DEFAULT_CONFIGS[weights_format]
  path = cli.checkout_config(name)
  if path is None:
    raise UserError(f'configs/{name} is not beside this installation of alexnet_jax: pass '
                    f'--config=PATH/configs/{name} from a checkout of the repository.')
  return cli.load_config_module(path).get_config()


def imagenet_class_names() -> tuple[tuple[str, ...], str] | None:
  """(ILSVRC-2012's WordNet ids in label order, the file they came from), or None where the
  installed tensorflow-datasets does not ship the list."""
  try:
    from tensorflow_datasets.core import tfds_path  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  for relative in _IMAGENET_LABELS:
    path = tfds_path(relative)
    try:
      names = tuple(path.read_text(encoding='utf-8').split())
    except OSError:
      continue
    if len(names) == _IMAGENET_CLASSES:
      return names, str(path)
  return None


def _class_names(num_classes: int) -> tuple[tuple[str, ...], str]:
  if num_classes == _IMAGENET_CLASSES:
    found = imagenet_class_names()
    if found is not None:
      return found
    logging.warning('tensorflow-datasets\' ILSVRC-2012 label list (%s) is not installed: the '
                    'classes are named by their labels, 0..%d.', _IMAGENET_LABELS[0],
                    num_classes - 1)
  else:
    logging.info('%d classes, not ILSVRC-2012\'s 1000: they are named by their labels, 0..%d.',
                 num_classes, num_classes - 1)
  return tuple(str(i) for i in range(num_classes)), 'indices'


def _refuse_a_run(workdir: str) -> None:
  """UserError where `workdir` holds checkpoints already (their run would be overwritten)."""
  directory = paths.resolve(checkpoints.checkpoint_dir(workdir))
  if directory.is_dir() and any(directory.iterdir()):
    raise UserError(f'--workdir={workdir} holds checkpoints already ({directory}): importing '
                    'would replace that run. Choose a new --workdir.')


def _check_network(config: ml_collections.ConfigDict) -> None:
  for field, value in _NETWORK.items():
    if config[field] != value:
      raise ConfigError(f'config.{field}={config[field]!r}: torchvision\'s AlexNet needs '
                        f'{value!r}; use configs/torchvision.py (or a config based on '
                        'configs/owt.py).')


def import_torchvision(file: str, workdir: str,
                       config: ml_collections.ConfigDict | None = None) -> Imported:
  """Writes the run of torchvision's AlexNet weights in `file` into `workdir`.

  Args:
    file: a state dict of `torchvision.models.alexnet()`, .pth (needs PyTorch) or .safetensors;
      wrapped under 'state_dict' or 'model', with DataParallel's 'module.' prefix, is accepted.
    workdir: the new run's directory; one that holds checkpoints is refused.
    config: the run's config (default: configs/torchvision.py); its num_classes is replaced by
      the file's. It must describe torchvision's network (the 'owt' variant).

  Returns:
    What was written (`Imported`). Raises UserError, before anything is written, where the file
    cannot be read or is not torchvision's AlexNet (naming missing or unexpected keys, or the
    shapes that differ), or the workdir holds checkpoints.
  """
  _refuse_a_run(workdir)
  state_dict = torchvision.read_state_dict(file)
  num_classes = torchvision.num_classes_of(state_dict, file)
  torchvision.check(state_dict, num_classes, file)
  params = torchvision.to_params(state_dict)
  del state_dict

  config = (default_config() if config is None else config).copy_and_resolve_references()
  config.num_classes = num_classes
  _check_network(config)
  config_lib.validate(config, num_devices=1)  # one process writes; no batch is split
  class_names, classes_source = _class_names(num_classes)

  model, tx, network = steps.initial_state(config, Kernels(), abstract=True)
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
  if shapes(params) != shapes(network.params):  # a bug: the conversion and the network disagree
    raise ValueError(f'The converted parameters {shapes(params)} do not fit the network '
                     f'{shapes(network.params)}.')
  # Step 0 with the imported parameters and a fresh optimizer state (momentum zeros).
  state = jax.tree_util.tree_map(np.asarray, steps.create_train_state(
      model, tx, config.seed, config.image_size, params=params))
  del model, tx

  cli.prepare_output(workdir, flag='workdir', folder=True)
  run_lib.record_classes(workdir, class_names)
  # Nothing was computed here: the kernels recorded are the reference forms.
  run_lib.write_config(workdir, config, Kernels())
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints)
  try:
    # The meta of a checkpoint saved before any evaluation: 'best' is then the latest.
    checkpoints.save(manager, 0, state, optim.LearningRate(config, 1).state(),
                     {'best_top1_error': None, 'best_step': None, 'epoch': 0.0,
                      'imported_from': {'format': 'torchvision',
                                        'file': os.path.abspath(os.path.expanduser(file))}})
  finally:
    checkpoints.finish(manager)
  num_params = models.count_params(params)
  logging.info('Imported %s: %s parameters, %d classes (names: %s) into %s', file,
               f'{num_params:,}', num_classes, classes_source, workdir)
  return Imported(workdir=str(paths.resolve(workdir)), num_classes=num_classes,
                  num_params=num_params, classes_source=classes_source)


def next_commands(workdir: str, num_classes: int) -> str:
  """What to run on the imported run: evaluate, predict, figures."""
  classes = '' if num_classes == _IMAGENET_CLASSES else f' --config.num_classes={num_classes}'
  return '\n'.join([
      'Evaluate it (ILSVRC-2012 validation, centre crop):',
      f'  python main.py --config=configs/torchvision.py --workdir={workdir} --mode=eval'
      f'{classes} --config.data_dir=~/tensorflow_datasets',
      'Classify images:',
      f'  python -m alexnet_jax.paper.predict --workdir={workdir} IMAGE.jpg',
      'Plot conv1\'s filters:',
      f'  python -m alexnet_jax.paper.figures filters --workdir={workdir} --output=filters.png',
  ])


# ---------------------------------------------------------------------------- command line


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum('format', None, FORMATS, 'Where the weights come from.')
  flags.DEFINE_string('file', None, 'The weights: a .pth (needs PyTorch) or .safetensors file.')
  flags.DEFINE_string('workdir', None, 'The run to write (a new directory).')
  config_flags.DEFINE_config_file(
      'config', cli.checkout_config(DEFAULT_CONFIGS['torchvision']),
      'The config the run records (default: configs/torchvision.py); num_classes is the file\'s.')
  flags.mark_flags_as_required(['format', 'file', 'workdir'])


def main(argv: Sequence[str]) -> None:
  """Imports --file into --workdir and prints what to run next."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  imported = import_torchvision(f.file, f.workdir, f.config)
  print(f'Wrote {imported.workdir}: {imported.num_params:,} parameters, '
        f'{imported.num_classes} classes.\n' + next_commands(f.workdir, imported.num_classes))


if __name__ == '__main__':
  cli.run(main, _define_flags)
