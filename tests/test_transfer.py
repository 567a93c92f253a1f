"""Fine-tuning (alexnet_jax/core/transfer.py, config.init_from and config.freeze_through): a new
run on another dataset starts from a trained run's layers that fit, and frozen layers stay put."""

import logging

import jax
import numpy as np
import pytest

from alexnet_jax.bench import pipeline as pipeline_benchmark
from alexnet_jax import config as config_lib
from alexnet_jax.core import run as run_lib
from alexnet_jax.core import steps
from alexnet_jax.core import train
from alexnet_jax.core import transfer
from alexnet_jax.errors import RunError

import conftest

CONVS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')


def _three_class_folder(root):
  """A folder dataset of 3 classes (the tiny run's digits have 10)."""
  pipeline_benchmark.write_jpegs(str(root), 32, num_classes=3, long_side=24)
  pipeline_benchmark.write_jpegs(str(root), 16, split='val', num_classes=3, long_side=24, seed=1)
  return {'dataset': 'folder', 'data_dir': str(root), 'eval_split': 'val', 'num_classes': 3}


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                   jax.tree_util.tree_leaves(b)))


@pytest.mark.slow
def test_a_fine_tune_on_other_classes_loads_what_fits_and_freezes_the_convolutions(
    tiny_workdir, tmp_path, caplog):
  data = _three_class_folder(tmp_path / 'data')
  source = conftest.latest_state(tiny_workdir, conftest.tiny_config())
  config = conftest.tiny_config(**data, init_from=tiny_workdir, freeze_through='conv5',
                                num_train_steps=2)
  # What the run starts from, computed here from its parts: the source's layers where they fit,
  # fc8 (3 classes, not 10) from the new run's own initialisation.
  _, _, initial = steps.initial_state(config)
  started = transfer.merge(initial.params, source.params)
  assert started.loaded == CONVS + ('fc6', 'fc7')
  assert list(started.kept) == ['fc8'] and 'shapes differ' in started.kept['fc8']
  for layer in started.loaded:
    assert _equal(started.params[layer], source.params[layer]), layer
  assert _equal(started.params['fc8'], initial.params['fc8'])

  with caplog.at_level(logging.INFO):
    conftest.train_tiny(tmp_path / 'fine_tune', **config)
  log = caplog.text
  assert 'Loaded: conv1, conv2, conv3, conv4, conv5, fc6, fc7.' in log, log
  assert "Not loaded (§5's initialisation): fc8 (shapes differ" in log, log
  tuned = conftest.latest_state(tmp_path / 'fine_tune', config)
  assert int(tuned.step) == 2
  for layer in CONVS:  # frozen: bit for bit the source's
    assert _equal(tuned.params[layer], source.params[layer]), layer
  for layer in ('fc6', 'fc7', 'fc8'):  # trained from where they started
    assert not _equal(tuned.params[layer], started.params[layer]), layer
  # The frozen layers keep no momentum: the optimizer state holds fc6-fc8's only.
  paths = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_leaves_with_path(tuned.opt_state)]
  assert not any(f"'{c}'" in p for c in CONVS for p in paths)
  assert any("'fc6'" in p for p in paths)
  # The fine-tune is a run of its own: evaluate/predict open it with its 3 classes.
  assert run_lib.open_run(str(tmp_path / 'fine_tune')).class_names() == [
      'class_00', 'class_01', 'class_02']

  # A resumed fine-tune continues its own checkpoint; the source is not read (it may be gone).
  caplog.clear()
  with caplog.at_level(logging.INFO):
    conftest.train_tiny(tmp_path / 'fine_tune', **dict(config, num_train_steps=3,
                                                       init_from=str(tmp_path / 'gone')))
  assert 'is not read: the run resumes its own checkpoint' in caplog.text
  assert 'Loaded:' not in caplog.text
  assert int(conftest.latest_state(tmp_path / 'fine_tune', config).step) == 3


def test_a_source_that_cannot_be_used_stops_before_anything_is_written(tiny_workdir, tmp_path):
  data = _three_class_folder(tmp_path / 'data')
  workdir = tmp_path / 'fine_tune'
  with pytest.raises(RunError, match='is not a directory'):
    train.train_and_evaluate(conftest.tiny_config(**data, init_from=str(tmp_path / 'missing')),
                             str(workdir))
  with pytest.raises(RunError, match="this run's own workdir"):
    train.train_and_evaluate(conftest.tiny_config(**data, init_from=str(workdir)), str(workdir))
  assert not workdir.exists()


def test_a_source_of_which_no_layer_fits_is_refused():
  _, _, initial = steps.initial_state(conftest.tiny_config())
  other = jax.tree_util.tree_map(lambda x: x[..., :1], initial.params)  # every shape differs
  with pytest.raises(RunError, match='no layer of that run fits this network'):
    transfer.start_from(transfer.Source(params=other, step=4, workdir='elsewhere'),
                        initial.params)


def test_freezing_changes_the_checkpoint_so_a_resume_with_another_choice_is_refused():
  before, after = conftest.tiny_config(), conftest.tiny_config(freeze_through='conv5')
  why = run_lib._shape_conflict(before, after)
  # (the frozen layers' momentum is not kept: the optimizer states differ in structure)
  assert why and 'opt_state' in why and 'nothing in the checkpoints' in why, why
  assert run_lib._shape_conflict(after, after) is None


def test_freeze_through_is_a_config_field_with_its_choices():
  config = conftest.tiny_config(freeze_through='conv6')
  with pytest.raises(config_lib.ConfigError, match="freeze_through='conv6'.*'conv5', 'fc6'"):
    config_lib.check_fields(config)
