"""Orbax checkpoints: round trip, and which checkpoints are kept."""

import numpy as np

from alexnet_jax.core import checkpoints


def _tree(value):
  return {'w': np.full((3, 2), value, np.float32), 'step': np.asarray(value, np.int32)}


def test_keeps_the_last_few_and_the_best_by_validation_error(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), keep=2)
  errors = {10: 0.6, 20: 0.3, 30: 0.5, 40: 0.45, 50: None, 60: 0.7}
  for step, err in errors.items():
    metrics = None if err is None else {checkpoints.BEST_METRIC: err}
    checkpoints.save(manager, step, _tree(step), _tree(0), {'best_step': 20}, metrics)
    manager.wait_until_finished()
  # The two most recent (50, 60) and the lowest error (20, with 0.3).
  assert sorted(manager.all_steps()) == [20, 50, 60]
  state, schedule, meta = checkpoints.restore(manager, _tree(0), _tree(0), step=20)
  np.testing.assert_array_equal(state['w'], _tree(20)['w'])
  assert meta['best_step'] == 20
  assert checkpoints.restore_meta(manager, 60)['best_step'] == 20
  latest, _, _ = checkpoints.restore(manager, _tree(0), _tree(0))
  assert int(latest['step']) == 60
  manager.close()


def test_no_checkpoint_restores_none(tmp_path):
  manager = checkpoints.create_manager(str(tmp_path), keep=1)
  assert checkpoints.restore(manager, _tree(0), _tree(0)) is None
  manager.close()
