"""alexnet_jax/paper/evaluate.py: §6's errors, 10-crop test and ensembles against the training
loop's.

`tiny_workdir` (a configs/tiny.py run of a few steps) comes from conftest.py.
"""

import json
import sys

import numpy as np
import pytest

import conftest
from alexnet_jax.core import evaluation
from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import run as run_lib
from alexnet_jax.core import parallel
from alexnet_jax.paper import evaluate

NUM_TEST_DIGITS = 360


@pytest.fixture(scope='session')
def second_workdir(tmp_path_factory):
  """Another tiny run (2 steps, seed 1) of the same classes: an ensemble partner."""
  return conftest.train_tiny(tmp_path_factory.mktemp('tiny_run_seed1'), num_train_steps=2,
                             seed=1)


def test_ensemble_errors_use_the_one_counting():
  probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
  labels = np.array([1, 0, 2])
  # Other classes at least as probable as the true one: 1 (a tie), 2, 1.
  result = evaluate.errors(probs, labels)
  assert result == {'top1_error': 1.0, 'top5_error': 0.0, 'num_examples': 3}
  for k, expected in ((1, 1.0), (2, 1 / 3), (3, 0.0)):
    assert np.mean(metrics_lib.topk_errors(probs, labels, k)) == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.parametrize('crop', ['center_crop', 'ten_crop'])
def test_ensemble_of_one_equals_the_training_loops_evaluation(tiny_workdir, crop):
  report = evaluate.evaluate_workdirs([tiny_workdir], crops=[crop])
  mine = report['results'][tiny_workdir][crop]
  assert report['results'][evaluate.ENSEMBLE][crop] == mine
  # The second code path: the training loop's pmapped sums (psum over devices) over the split.
  run = run_lib.open_run(tiny_workdir)
  config = run.config
  config.num_eval_steps = -1
  restored = run.restore()
  theirs = evaluation.evaluate(evaluation.pmapped_eval_step(restored.model, config, run.mean()),
                               parallel.replicate(restored.params), config,
                               ten_crop=evaluate.CROP_SETTINGS[crop], mean=run.mean())
  assert mine['num_examples'] == theirs['eval/num_examples'] == NUM_TEST_DIGITS
  assert mine['top1_error'] == pytest.approx(theirs['eval/top1_error'], abs=1e-9)
  assert mine['top5_error'] == pytest.approx(theirs['eval/top5_error'], abs=1e-9)


def test_ensemble_averages_the_softmax_outputs(tiny_workdir, second_workdir):
  outputs = []
  for wd in (tiny_workdir, second_workdir):
    run = run_lib.open_run(wd)
    restored = run.restore()
    outputs.append(evaluation.split_probabilities(restored.model, restored.params, run.config,
                                                  ten_crop=False, mean=run.mean()))
  for probs, _ in outputs:
    assert probs.shape == (NUM_TEST_DIGITS, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
  average = (outputs[0][0] + outputs[1][0]) / 2
  labels = outputs[0][1]
  top5 = np.argsort(-average, axis=1)[:, :5]
  expected_top1 = np.mean(np.argmax(average, axis=1) != labels)
  expected_top5 = np.mean([label not in row for label, row in zip(labels, top5)])
  report = evaluate.evaluate_workdirs([tiny_workdir, second_workdir], crops=['center_crop'])
  ensemble = report['results'][evaluate.ENSEMBLE]['center_crop']
  assert ensemble['top1_error'] == pytest.approx(expected_top1)
  assert ensemble['top5_error'] == pytest.approx(expected_top5)


@pytest.mark.slow
def test_command_prints_the_table_and_writes_json(tiny_workdir, tmp_path):
  output = tmp_path / 'results.json'
  proc = conftest.run(
      [sys.executable, '-m', 'alexnet_jax.paper.evaluate', f'--workdirs={tiny_workdir}',
       f'--output={output}'], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'average of 1 models' in proc.stdout and 'ten_crop top-1' in proc.stdout
  assert 'batch' in proc.stderr  # progress
  report = json.loads(output.read_text())
  assert set(report['results']) == {tiny_workdir, evaluate.ENSEMBLE}
  assert report['results'][tiny_workdir]['ten_crop']['num_examples'] == NUM_TEST_DIGITS


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    evaluate.evaluate_workdirs([str(tmp_path)])


def test_sums_are_global_over_processes(monkeypatch):
  """Each process counts its share; every process reports the sums of all (here: two equal
  shares, gathered as JAX's multi-process runtime would)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', lambda x: np.stack([x, x]))
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
  result = evaluate.errors(probs, np.array([0, 0, 1]))
  assert result == {'top1_error': pytest.approx(2 / 3), 'top5_error': 0.0, 'num_examples': 6}
