"""Test set-up: simulate 8 CPU devices (for the pmap tests) before JAX starts; shared fixtures."""

import os
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compiled programs are cached across tests and the main.py subprocesses they start: the same
# tiny network is compiled by many tests.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'alexnet_jax_test_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Every other temporary file of the tests, and of the commands they start, goes into one folder
# of /tmp: test_faults.py checks that a run writes nothing into /tmp itself, and tests running
# beside it (`pytest -n 2`) must not make new entries there.
_TMP = os.path.join(tempfile.gettempdir(), 'alexnet_jax_tests')
os.makedirs(_TMP, exist_ok=True)
os.environ['TMPDIR'] = tempfile.tempdir = _TMP


import pytest  # pylint: disable=g-import-not-at-top  (after the environment above)

from alexnet_jax import cli  # pylint: disable=g-import-not-at-top

cli.quiet_tensorflow_logs()  # As every command starts: TensorFlow without Keras.


def train_tiny(path, **overrides) -> str:
  """Trains configs/tiny.py (16x16 digits) with `overrides` into `path`; returns the workdir."""
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top  (JAX after XLA_FLAGS)
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.update(overrides)
  train.train_and_evaluate(config, str(path))
  return str(path)


def latest_state(workdir, config):
  """The TrainState of the latest checkpoint in `workdir` (a run of `config`), host arrays."""
  from alexnet_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import optim  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import steps  # pylint: disable=g-import-not-at-top
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, read_only=True)
  _, _, state = steps.initial_state(config)
  restored = checkpoints.restore(manager, state, optim.LearningRate(config, 10).state())
  manager.close()
  return restored[0]


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory):
  """A trained tiny run (4 steps) with its checkpoint, classes and statistics, trained once for
  test_evaluate.py, test_predict.py and test_figures.py."""
  return train_tiny(tmp_path_factory.mktemp('tiny_run'), num_train_steps=4)
