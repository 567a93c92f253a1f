"""A tiny, fast run for tests and smoke checks: the small network on 16x16 digits, a few steps.

  python main.py --config=configs/tiny.py --workdir=/tmp/tiny

Runs in seconds on a CPU; it exercises the whole loop (data, pmap step, evaluation, checkpoints,
metrics) and learns nothing worth reporting.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
  c = digits.get_config()
  c.resize_size = 20
  c.image_size = 16
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_epochs = 1
  c.num_train_steps = 4
  c.num_eval_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  return c
