"""What a config may hold, checked in one place before any work; and a saved config read back.

`SCHEMA` names every field of a run's config (configs/alexnet.py sets them all, with the paper's
values and sections) and what each may hold. `validate` checks a config against it and the
relations between fields, naming the field, the value and what is allowed; nothing touches the
network. `from_json` reads a run's saved config.json, filling the fields an older version did
not write with the values that reproduce how that version ran.

The paper's numbers live in configs/; this module holds only what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any

import ml_collections

from alexnet_jax import paths
from alexnet_jax.errors import ConfigError
from alexnet_jax.errors import RunError

BUILTIN_DATASETS = ('digits', 'folder', 'prepared', 'synthetic')
VARIANTS = ('paper', 'one_column', 'owt', 'small', 'small_one_column')
ACTIVATIONS = ('relu', 'tanh')
DTYPES = ('float32', 'bfloat16')
LR_SCHEDULES = ('step', 'plateau')
OPTIMIZERS = ('sgd', 'lars')
# How the network and the batch live on the devices (alexnet_jax/core/parallel.py).
STRATEGIES = ('data', 'columns', 'hybrid')
LIGHTING_SCALES = ('paper', 'cuda_convnet')
# Kernel choices (alexnet_jax/core/kernels.py resolves 'auto' once per run).
COLUMN_IMPLS = ('auto', 'split', 'grouped')
POOL_IMPLS = ('auto', 'reduce_window', 'mask')
LRN_IMPLS = ('auto', 'reduce_window', 'custom')
CONV_IMPLS = ('auto', 'direct', 'im2col')
CONV_BACKENDS = ('auto', 'xla', 'onednn')
# Fine-tuning: every layer up to and including this one is frozen ('none': nothing is).
FREEZE_THROUGH = ('none', 'conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7')

_REQUIRED = object()
# The default upper bound of an integer field: JAX computes in 32-bit integers (jax_enable_x64 is
# off), so a larger seed, size or step count overflows there (`OverflowError ... int32`), far
# from the flag that set it.
INT_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Field:
  """What one config field may hold.

  kind: 'bool', 'int', 'number' (int or float), 'str', 'numbers' (a tuple of numbers) or
  'choice'. low/high bound numbers (inclusive unless *_open). optional: None is allowed.
  legacy: the value a config.json written before this field existed is read with (the
  behaviour of that version); _REQUIRED where every saved config has the field.
  """
  kind: str
  choices: tuple[Any, ...] = ()
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  optional: bool = False
  legacy: Any = _REQUIRED

  def allowed(self) -> str:
    """What the field may hold, in words, for error messages."""
    if self.kind == 'choice':
      text = 'one of ' + ', '.join(repr(c) for c in self.choices)
    elif self.kind == 'bool':
      text = 'True or False'
    elif self.kind == 'str':
      text = 'a non-empty string'
    else:
      what = {'int': 'an integer', 'number': 'a number',
              'numbers': 'a tuple of numbers, each'}[self.kind]
      bounds = []
      if self.low is not None:
        bounds.append(f'{">" if self.low_open else ">="} {_number_text(self.low)}')
      if self.high is not None:
        bounds.append(f'{"<" if self.high_open else "<="} {_number_text(self.high)}')
      text = what + (' ' + ' and '.join(bounds) if bounds else '')
    return text + (' (or None)' if self.optional else '')

  def accepts(self, value: Any) -> bool:
    """Whether `value` is of the field's kind and within its bounds."""
    if value is None:
      return self.optional
    if self.kind == 'choice':
      return any(value == c and type(value) is type(c) for c in self.choices)
    if self.kind == 'bool':
      return isinstance(value, bool)
    if self.kind == 'str':
      return isinstance(value, str) and bool(value.strip())
    if self.kind == 'numbers':
      return isinstance(value, (tuple, list)) and all(self._in_bounds(v) for v in value)
    if self.kind == 'int' and not (isinstance(value, int) and not isinstance(value, bool)):
      return False
    return self._in_bounds(value)

  def _in_bounds(self, v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    if self.low is not None and (v <= self.low if self.low_open else v < self.low):
      return False
    if self.high is not None and (v >= self.high if self.high_open else v > self.high):
      return False
    return True


def _number_text(bound: float) -> str:
  """A bound as a reader writes it: 2147483647 (not 2.14748e+09), 0.5."""
  return str(bound) if isinstance(bound, int) else f'{bound:g}'


def _choice(*choices, legacy=_REQUIRED) -> Field:
  return Field('choice', choices=choices, legacy=legacy)


def _int(low=None, high=INT_MAX, legacy=_REQUIRED) -> Field:
  return Field('int', low=low, high=high, legacy=legacy)


def _num(low=None, high=None, low_open=False, high_open=False) -> Field:
  return Field('number', low=low, high=high, low_open=low_open, high_open=high_open)


_BOOL = Field('bool')
_STR = Field('str')
_PATH = Field('str', optional=True)

SCHEMA: dict[str, Field] = {
    # Data.
    'dataset': _STR,  # BUILTIN_DATASETS or a TFDS name registered locally (see validate).
    'data_dir': _PATH,
    'train_split': _STR,
    'eval_split': _STR,
    'num_classes': _int(1),
    'resize_size': _int(1),
    'image_size': _int(1),
    'resize_antialias': Field('bool', legacy=True),
    'mean': _choice('image', 'channel', 'none'),
    # Runs before these fields subtracted their training set's mean and divided by nothing.
    'mean_rgb': Field('numbers', low=0, high=255, optional=True, legacy=None),
    'std_rgb': Field('numbers', low=0, low_open=True, optional=True, legacy=None),
    'stats_file': _PATH,
    'stats_num_images': _int(0),
    'random_crop': _BOOL,
    'random_flip': _BOOL,
    'pca_lighting': _BOOL,
    'pca_lighting_std': _num(0),
    'pca_lighting_scale': _choice(*LIGHTING_SCALES),
    'pca_file': _PATH,
    'shuffle_buffer': _int(1),
    'cache': _BOOL,
    'ten_crop_eval': _BOOL,
    # Runs before this field sent float32 images, finished on the host.
    'device_preprocessing': Field('bool', legacy=False),
    # Model.
    'model': _choice(*VARIANTS),
    'lrn': _BOOL,
    'lrn_k': _num(0),
    'lrn_n': _int(1),
    'lrn_alpha': _num(0),
    'lrn_beta': _num(0),
    'lrn_alpha_convention': _choice('paper', 'divided'),
    # Runs before this field normalised across the column boundary.
    'lrn_within_columns': Field('bool', legacy=False),
    'overlapping_pool': _BOOL,
    'activation': _choice(*ACTIVATIONS),
    'dropout_rate': _num(0, 1, high_open=True),
    'weight_init_std': _num(0, low_open=True),
    'bias_init_one': _num(),
    'dtype': _choice(*DTYPES),
    'column_impl': _choice(*COLUMN_IMPLS),
    'pool_impl': _choice(*POOL_IMPLS, legacy='auto'),
    'lrn_impl': _choice(*LRN_IMPLS, legacy='auto'),
    'conv_impl': _choice(*CONV_IMPLS, legacy='auto'),
    'conv_backend': _choice(*CONV_BACKENDS, legacy='auto'),
    # Optimisation.
    'batch_size': _int(1),
    'eval_batch_size': _int(1),
    'num_epochs': _num(0, low_open=True),
    'learning_rate': _num(0, low_open=True),
    'momentum': _num(0, 1, high_open=True),
    'weight_decay': _num(0),
    # Runs before this field decayed the biases too.
    'decay_biases': Field('bool', legacy=True),
    # Large batches (runs before these fields had plain SGD, no scaling and no warm-up).
    'optimizer': _choice(*OPTIMIZERS, legacy='sgd'),
    'lars_trust_coefficient': Field('number', low=0, low_open=True, legacy=0.001),
    'lr_reference_batch': _int(0, legacy=0),
    'warmup_epochs': Field('number', low=0, legacy=0.0),
    'warmup_init_lr': Field('number', low=0, optional=True, legacy=None),
    'lr_schedule': _choice(*LR_SCHEDULES),
    'lr_decay_factor': _num(0, 1, low_open=True),
    'lr_decay_epochs': Field('numbers', low=0),
    'plateau_max_decays': _int(0),
    'plateau_patience': _int(0),
    'seed': _int(0),
    # Fine-tuning (runs before these fields started from the paper's initialisation).
    'init_from': Field('str', optional=True, legacy=None),
    'freeze_through': _choice(*FREEZE_THROUGH, legacy='none'),
    # Loop, logging, checkpoints.
    'log_every_steps': _int(1),
    'eval_every_epochs': _num(0, low_open=True),
    'eval_every_steps': _int(0),
    'checkpoint_every_steps': _int(1),
    'keep_checkpoints': _int(1),
    'num_train_steps': _int(-1),
    'num_eval_steps': _int(-1),
    # Parallelism (runs before these fields were data-parallel).
    'parallelism': _choice(*STRATEGIES, legacy='data'),
    'model_parallel': _int(0, legacy=0),
    # Feeding the devices and profiling (runs before these fields had no prefetch or profile).
    'device_prefetch': _int(0, legacy=0),
    'profile_steps': _int(0, legacy=0),
    'profile_after_steps': _int(0, legacy=5),
}


def _fail(field: str, value: Any, why: str) -> ConfigError:
  return ConfigError(f'config.{field}={value!r}: {why}')


def rejected(field: str, value: Any) -> ConfigError:
  """The error for `value` in `field`: a value of the wrong kind or out of bounds, or (from
  the command line, `--config.FIELD=TEXT`) a text that cannot be read as the field's kind, or
  a FIELD that is not one."""
  if field not in SCHEMA:
    close = difflib.get_close_matches(field, SCHEMA, n=1)
    return _fail(field, value, f'no such field; did you mean config.{close[0]}?' if close else
                 'no such field; the fields are those of configs/alexnet.py')
  return _fail(field, value, f'must be {SCHEMA[field].allowed()}')


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless `config` has exactly the fields of SCHEMA, each of its kind and
  within its bounds. Needs neither JAX nor the data: every command with a config flag runs it as
  it parses its flags (`cli.parse_flags`), before its slow imports; `validate` runs it first."""
  missing = [name for name in SCHEMA if name not in config]
  if missing:
    raise ConfigError(f'the config lacks the fields {missing}: start from configs/alexnet.py')
  unknown = sorted(set(config.keys()) - set(SCHEMA))
  if unknown:
    raise ConfigError(f'the config has unknown fields {unknown}; the fields are those of '
                      'configs/alexnet.py')
  for name, field in SCHEMA.items():
    if not field.accepts(config[name]):
      raise rejected(name, config[name])


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError, naming field, value and what is allowed, for any value that cannot run.

  Checks every field (`check_fields`), then the relations between fields: crops no larger than
  the square, batches that split over `num_devices` (default: all JAX devices), a dataset that
  exists here. Whether the strategy can be laid out on the devices is `core.parallel.check`'s. Touches no network: a TFDS name is checked against the builders registered in
  the installed tensorflow-datasets.
  """
  check_fields(config)
  if config.image_size > config.resize_size:
    raise _fail('image_size', config.image_size,
                f'crops cannot be larger than the square image (resize_size={config.resize_size})')
  for name in ('mean_rgb', 'std_rgb'):
    if config[name] is not None and len(config[name]) != 3:
      raise _fail(name, config[name], 'must be three numbers, one per RGB channel (or None)')
  if config.mean_rgb is not None and config.mean != 'channel':
    raise _fail('mean_rgb', config.mean_rgb,
                f"a given RGB mean needs config.mean='channel' (it is {config.mean!r})")
  if config.lrn_n % 2 != 1:
    raise _fail('lrn_n', config.lrn_n, 'the LRN window must be an odd number of channels')
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % num_devices:
      raise _fail(name, config[name], f'must divide evenly over the {num_devices} devices '
                  f'(try a multiple of {num_devices})')
  if config.dataset == 'folder' and not config.data_dir:
    raise _fail('data_dir', config.data_dir,
                "dataset 'folder' needs --config.data_dir=ROOT (ROOT/<split>/<class>/*.jpg)")
  if config.dataset == 'prepared' and not config.data_dir:
    raise _fail('data_dir', config.data_dir, "dataset 'prepared' needs --config.data_dir=DIR, "
                'the output of `python -m alexnet_jax.data.prepare`')
  if config.dataset not in BUILTIN_DATASETS and not is_registered_tfds(config.dataset):
    raise _fail('dataset', config.dataset, f'is neither one of {BUILTIN_DATASETS} nor a dataset '
                'of the installed tensorflow-datasets (e.g. imagenet2012, mnist)')


def is_registered_tfds(name: str) -> bool:
  """Whether `name` (optionally name:version or name/config) is a builder that the installed
  tensorflow-datasets registers. Unlike tfds.list_builders(), asks no community index online."""
  try:
    from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f'config.dataset={name!r} is read with tensorflow-datasets, which is not '
                      'installed here (pip install -r requirements.txt)') from None
  base = name.split(':')[0].split('/')[0]
  return base in registered.list_imported_builders()


# ---------------------------------------------------------------------------- saved configs

# A run's saved config, in its workdir.
FILENAME = 'config.json'
# Keys of config.json that are records of the run, not config fields.
RECORD_KEYS = ('resolved_kernels',)


def read_saved(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, records) that the run in `workdir` saved (`from_json`); RunError naming what is
  missing when `workdir` is not a run's."""
  workdir = paths.resolve(workdir)
  if not workdir.is_dir():
    raise RunError(f'{workdir} is not a directory: pass the workdir of a trained run '
                   '(`python main.py --config=... --workdir=...` makes one).')
  path = workdir / FILENAME
  if not path.exists():
    raise RunError(f'{path} does not exist: {workdir} is not the workdir of a run (train one '
                   'with `python main.py --config=... --workdir=...`).')
  return from_json(path.read_text(encoding='utf-8'), str(path))


def to_json(config: ml_collections.ConfigDict, **records: Any) -> str:
  """config.json's text: the config's fields, plus records of the run (RECORD_KEYS)."""
  unknown = set(records) - set(RECORD_KEYS)
  if unknown:
    raise ValueError(f'not records of a run: {sorted(unknown)}')
  data = json.loads(config.to_json_best_effort())
  data.update(records)
  return json.dumps(data, indent=2)


def from_json(text: str, source: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(config, records) of a saved config.json; `source` names it in errors.

  Fields an older version did not write take their `legacy` value; a field that has none, or a
  key that is neither a field nor a record, is a RunError naming it.
  """
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise RunError(f'{source} is not valid JSON ({e}): the run\'s config is damaged') from None
  records = {k: data.pop(k) for k in RECORD_KEYS if k in data}
  unknown = sorted(set(data) - set(SCHEMA))
  if unknown:
    raise RunError(f'{source} has fields this version does not know: {unknown}; was it '
                   'written by a newer alexnet_jax?')
  for name, field in SCHEMA.items():
    if name not in data:
      if field.legacy is _REQUIRED:
        raise RunError(f'{source} lacks the field {name!r}, which every saved config has: '
                       'the file is damaged or not a run\'s config.json')
      data[name] = field.legacy
    elif field.kind == 'numbers' and isinstance(data[name], list):
      data[name] = tuple(data[name])
  return ml_collections.ConfigDict(data), records
