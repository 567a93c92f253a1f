"""The training loop: resume, profile, a lost process, divergence and bad configs (main.py end
to end, signals and several processes: test_multiprocess.py)."""

import os

import jax
import numpy as np
import pytest

import conftest

from alexnet_jax import errors
from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import train
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = tiny.get_config()
  c.update(overrides)
  return c


def test_resumed_run_ends_with_the_same_parameters(tmp_path):
  straight = _config(num_train_steps=4)
  train.train_and_evaluate(straight, str(tmp_path / 'straight'))
  interrupted = _config(num_train_steps=2)
  train.train_and_evaluate(interrupted, str(tmp_path / 'resumed'))
  assert conftest.latest_state(str(tmp_path / 'resumed'), interrupted).step == 2
  train.train_and_evaluate(straight, str(tmp_path / 'resumed'))
  a = conftest.latest_state(str(tmp_path / 'straight'), straight)
  b = conftest.latest_state(str(tmp_path / 'resumed'), straight)
  assert int(a.step) == int(b.step) == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
  # The resumed run logged only the steps it ran.
  steps_logged = [r['step'] for r in metrics_lib.read_jsonl(tmp_path / 'resumed' /
                                                            'metrics.jsonl') if 'train/loss' in r]
  assert steps_logged == [1, 2, 3, 4]


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


def test_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  good = _config(num_train_steps=2, checkpoint_every_steps=1)
  train.train_and_evaluate(good, str(tmp_path))
  # The same workdir resumed with a rate that diverges at once: it stops, the step-2 checkpoint
  # stays the latest, and no evaluation of the diverged network is recorded.
  config = _config(learning_rate=1e8, num_train_steps=50, checkpoint_every_steps=1,
                   eval_every_steps=1, log_every_steps=1000)
  with pytest.raises(errors.TrainingDivergedError, match='became (nan|inf|NaN)|NaN or infinite'):
    train.train_and_evaluate(config, str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert saved[-1] == 2
  state = conftest.latest_state(str(tmp_path), config)
  assert int(state.step) == 2
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))
  evals = [r for r in metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl') if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [2]


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
    train.train_and_evaluate(_config(**{field: value}), str(workdir))
  assert not os.path.exists(workdir)


def test_profile_steps_write_a_trace_for_tensorboard_and_perfetto(tmp_path):
  config = _config(num_train_steps=3, profile_steps=1, profile_after_steps=1)
  train.train_and_evaluate(config, str(tmp_path))
  traces = list((tmp_path / 'profile' / 'plugins' / 'profile').iterdir())
  assert len(traces) == 1  # One trace, of steps 2..2.
  names = {p.name for p in traces[0].iterdir()}
  assert any(n.endswith('.xplane.pb') for n in names), names  # TensorBoard's profile plugin
  assert 'perfetto_trace.json.gz' in names  # ui.perfetto.dev
