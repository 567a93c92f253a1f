"""alexnet_jax/config.py: every field checked in one place, and old config.json files."""

import importlib
import json

import ml_collections
import pytest

from alexnet_jax import errors
from alexnet_jax import config as config_lib
from configs import alexnet

CONFIG_MODULES = ('alexnet', 'digits', 'tiny', 'one_column', 'owt', 'ablations')


def test_schema_names_exactly_the_fields_of_the_paper_config():
  assert set(alexnet.get_config().keys()) == set(config_lib.SCHEMA)


@pytest.mark.parametrize('name', CONFIG_MODULES)
def test_every_shipped_config_is_valid(name):
  config_lib.validate(importlib.import_module(f'configs.{name}').get_config(), num_devices=1)


def _bad_values(field):
  """Values of the wrong kind, out of range, and empty, made from the field's own description."""
  values = ['', None, [], 'not-a-value']
  if field.kind == 'choice':
    values += [str(field.choices[0]).upper() + '!']
  if field.kind in ('int', 'number', 'numbers'):
    values += [float('nan'), True]
    if field.low is not None:
      values += [field.low - 1 if not field.low_open else field.low]
    if field.high is not None:
      values += [field.high + 1 if not field.high_open else field.high]
  if field.kind == 'int':
    values += [1.5]
  if field.kind == 'bool':
    values += [1, 'yes']
  if field.kind == 'numbers':
    values = [v for v in values if v != []] + [(-1.0,) if field.low is not None else ('x',)]
  return [v for v in values if not field.accepts(v)]


@pytest.mark.parametrize('field', sorted(config_lib.SCHEMA))
def test_every_field_rejects_bad_values_naming_field_value_and_what_is_allowed(field):
  spec = config_lib.SCHEMA[field]
  bad = _bad_values(spec)
  assert bad, field
  tried = 0
  for value in bad:
    config = alexnet.get_config()
    with config.ignore_type():
      config[field] = value
    value = config[field]
    if spec.accepts(value):  # ConfigDict converted it (True -> 1.0 for a float field).
      continue
    tried += 1
    with pytest.raises(errors.ConfigError) as e:
      config_lib.validate(config, num_devices=1)
    assert f'config.{field}={value!r}' in str(e.value), (field, value, str(e.value))
    assert spec.allowed() in str(e.value)
  assert tried >= 2, field


def test_relations_between_fields():
  config = alexnet.get_config()
  config.image_size = 257
  with pytest.raises(errors.ConfigError, match='image_size=257.*resize_size=256'):
    config_lib.validate(config, num_devices=1)
  config = alexnet.get_config()
  with pytest.raises(errors.ConfigError, match='batch_size=128.*3 devices'):
    config_lib.validate(config, num_devices=3)
  config.lrn_n = 4
  with pytest.raises(errors.ConfigError, match='lrn_n=4.*odd'):
    config_lib.validate(config, num_devices=1)
  config = alexnet.get_config()
  config.dataset = 'folder'
  with pytest.raises(errors.ConfigError, match='data_dir=None'):
    config_lib.validate(config, num_devices=1)


def test_tfds_names_are_checked_offline(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def no_network(*args, **kwargs):
    raise AssertionError('tfds.list_builders() may reach the network')

  monkeypatch.setattr(tfds, 'list_builders', no_network)
  config = alexnet.get_config()
  for name in ('imagenet2012', 'mnist', 'imagenet2012:5.1.0'):
    config.dataset = name
    config_lib.validate(config, num_devices=1)
  config.dataset = 'imagenet2013'
  with pytest.raises(errors.ConfigError, match="dataset='imagenet2013'"):
    config_lib.validate(config, num_devices=1)


def test_unknown_and_missing_fields_are_errors():
  config = alexnet.get_config()
  config.unlock()
  config.learning_rat = 0.1
  with pytest.raises(errors.ConfigError, match='unknown fields.*learning_rat'):
    config_lib.validate(config, num_devices=1)


def test_an_old_config_json_opens_with_the_values_it_ran_with():
  data = json.loads(alexnet.get_config().to_json_best_effort())
  for field in ('pool_impl', 'lrn_impl', 'conv_impl', 'conv_backend', 'resize_antialias'):
    del data[field]
  config, records = config_lib.from_json(json.dumps(data), 'old/config.json')
  assert records == {}
  assert (config.pool_impl, config.conv_backend, config.resize_antialias) == ('auto', 'auto', True)
  assert config.lr_decay_epochs == (30, 60, 80)
  config_lib.validate(config, num_devices=1)
  # A field every saved config has, missing: the file is damaged.
  del data['learning_rate']
  with pytest.raises(errors.RunError, match="old/config.json lacks the field 'learning_rate'"):
    config_lib.from_json(json.dumps(data), 'old/config.json')
  with pytest.raises(errors.RunError, match='not valid JSON'):
    config_lib.from_json('{', 'x/config.json')


def test_records_round_trip():
  config = alexnet.get_config()
  text = config_lib.to_json(config, resolved_kernels={'conv_backend': 'xla'})
  back, records = config_lib.from_json(text, 'config.json')
  assert records == {'resolved_kernels': {'conv_backend': 'xla'}}
  assert isinstance(back, ml_collections.ConfigDict)
  assert back.to_dict() == {**config.to_dict(), 'lr_decay_epochs': (30, 60, 80)}
