"""alexnet_jax/paper/curves.py: a run's training and evaluation curves from its metrics.jsonl."""

import json

import pytest

from alexnet_jax.errors import RunError
from alexnet_jax.paper import curves


def _write_metrics(workdir, records):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def test_writes_a_png_with_evaluations_placed_by_epoch(tmp_path):
  run = tmp_path / 'run'
  _write_metrics(run, [  # 10 steps per epoch; the rate drops after step 20.
      {'step': 10, 'train/loss': 2.0, 'train/top1_error': 0.8, 'lr': 0.01, 'epoch': 1.0},
      {'step': 20, 'train/loss': 1.0, 'train/top1_error': 0.4, 'lr': 0.01, 'epoch': 2.0},
      {'step': 20, 'eval/loss': 1.1, 'eval/top1_error': 0.5, 'eval/top5_error': 0.1},
      {'step': 30, 'train/loss': 'nan', 'train/top1_error': 0.3, 'lr': 0.001, 'epoch': 3.0},
      {'step': 30, 'eval/loss': 0.9, 'eval/top1_error': 0.25, 'eval/top5_error': 0.0}])
  output = tmp_path / 'out' / 'curves.png'
  output.parent.mkdir()
  drawn = curves.plot_curves(str(run), str(output))
  assert output.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert drawn['x_label'] == 'epoch'
  assert drawn['eval']['eval/top1_error'] == ([2.0, 3.0], [0.5, 0.25])
  assert drawn['train']['train/loss'][1][2] != drawn['train']['train/loss'][1][2]  # NaN kept
  assert drawn['lr_changes'] == [3.0]


def test_a_run_without_training_records_is_drawn_against_steps(tmp_path):
  _write_metrics(tmp_path, [{'step': 5, 'eval/loss': 1.0, 'eval/top1_error': 0.5,
                             'eval/top5_error': 0.2}])
  drawn = curves.plot_curves(str(tmp_path), str(tmp_path / 'c.png'))
  assert drawn['x_label'] == 'step' and drawn['eval']['eval/top1_error'] == ([5.0], [0.5])
  assert (tmp_path / 'c.png').exists()


def test_a_folder_without_metrics_is_an_error_naming_it(tmp_path):
  with pytest.raises(RunError, match='metrics.jsonl does not exist'):
    curves.plot_curves(str(tmp_path), str(tmp_path / 'c.png'))
