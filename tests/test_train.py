"""The training loop: profile, a lost process and bad configs (resume, signals, divergence and
other faults: test_faults.py; several processes: test_multiprocess.py)."""

import os

import jax
import pytest

from alexnet_jax import errors
from alexnet_jax.core import train

import conftest


def test_a_failed_collective_says_another_process_is_gone(monkeypatch):
  # What process 1 of a 2-process run sees when process 0 is killed mid-step (Gloo's error, as
  # measured here); test_multiprocess.py runs the other case, process 1 killed, for real.
  gloo = ('UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:547] '
          'Connection closed by peer [127.0.0.1]:12009')
  with pytest.raises(jax.errors.JaxRuntimeError):  # One process: an error of its own.
    with train._collective_errors():  # pylint: disable=protected-access
      raise jax.errors.JaxRuntimeError(gloo)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with pytest.raises(errors.RunError, match='Process 1 of 2 lost the other processes: .*Gloo'):
    with train._collective_errors():  # pylint: disable=protected-access
      raise jax.errors.JaxRuntimeError(gloo)


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', -128, 'an integer >= 1'),
    ('batch_size', 12, 'divide evenly over the 8 devices'),
    ('eval_batch_size', 0, 'an integer >= 1'),
    ('dataset', 'imagenet2013', 'neither one of'),
    ('model', 'resnet', "one of 'paper'"),
    ('lr_schedule', 'cosine', "one of 'step', 'plateau'"),
    ('image_size', 64, 'larger than the square image'),
    ('checkpoint_every_steps', 0, 'an integer >= 1'),
    ('pool_impl', 'fast', "one of 'auto'"),
    ('lrn_alpha_convention', 'both', "one of 'paper', 'divided'"),
])
def test_bad_config_values_stop_before_any_work(tmp_path, field, value, message):
  workdir = tmp_path / 'run'
  with pytest.raises(errors.ConfigError, match=f'config.{field}=.*{message}'):
    train.train_and_evaluate(conftest.tiny_config(**{field: value}), str(workdir))
  assert not os.path.exists(workdir)


def test_profile_steps_write_a_trace_for_tensorboard_and_perfetto(tmp_path):
  config = conftest.tiny_config(num_train_steps=3, profile_steps=1, profile_after_steps=1)
  train.train_and_evaluate(config, str(tmp_path))
  traces = list((tmp_path / 'profile' / 'plugins' / 'profile').iterdir())
  assert len(traces) == 1  # One trace, of steps 2..2.
  names = {p.name for p in traces[0].iterdir()}
  assert any(n.endswith('.xplane.pb') for n in names), names  # TensorBoard's profile plugin
  assert 'perfetto_trace.json.gz' in names  # ui.perfetto.dev
