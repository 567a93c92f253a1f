"""Deciding whether a run spans processes, and the errors for half-given settings (the real
2-process runs are in test_multiprocess.py)."""

import pytest

from alexnet_jax import distributed
from alexnet_jax.errors import UserError


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, 'detected_cluster', lambda: None)


def test_nothing_given_and_no_cluster_is_one_process():
  assert distributed.initialize() is False


@pytest.mark.parametrize('kwargs,message', [
    ({'num_processes': 2}, 'needs all of --coordinator_address'),
    ({'coordinator_address': '127.0.0.1:1234', 'process_id': 0}, 'needs all of'),
    ({'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2}, r'must be in 0\.\.1'),
    ({'coordinator_address': 'h:1', 'num_processes': 0, 'process_id': 0}, 'must be >= 1'),
    ({'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 0,
      'heartbeat_timeout_s': 0}, 'heartbeat_timeout_s=0 must be >= 1'),
])
def test_incomplete_or_bad_settings_are_user_errors(kwargs, message):
  with pytest.raises(UserError, match=message):
    distributed.initialize(**kwargs)


def test_settings_come_from_the_environment_too(monkeypatch):
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, 'two')
  with pytest.raises(UserError, match="JAX_NUM_PROCESSES='two' must be an integer"):
    distributed.initialize()
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '2')
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, '5')
  monkeypatch.setenv(distributed.ENV_COORDINATOR, '127.0.0.1:1234')
  with pytest.raises(UserError, match=r'--process_id=5 must be in 0\.\.1'):
    distributed.initialize()

