"""alexnet_jax/paper/ablations.py and configs/ablations.py: each ablation switches off one
choice."""

import json
import os

import numpy as np
import pytest

from alexnet_jax.paper import ablations
from alexnet_jax.data import stats as data_stats
from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import models
from configs import ablations as ablation_configs
from configs import digits

# configs/tiny.py's sizes: the sweep's machinery, not its numbers.
TINY = {'resize_size': 20, 'image_size': 16, 'batch_size': 16, 'eval_batch_size': 64,
        'num_train_steps': 2, 'num_eval_steps': 1, 'log_every_steps': 1}


def test_each_ablation_changes_only_its_field():
  base = ablation_configs.get_config('baseline').to_dict()
  digits_config = digits.get_config().to_dict()
  assert base['pca_lighting'] and not digits_config['pca_lighting']
  expected = {'no_lrn': {'lrn': False}, 'non_overlapping_pool': {'overlapping_pool': False},
              'no_pca_lighting': {'pca_lighting': False}, 'no_dropout': {'dropout_rate': 0.0},
              'one_column': {'model': 'small_one_column'}}
  for name, change in expected.items():
    config = ablation_configs.get_config(name).to_dict()
    diff = {k: v for k, v in config.items() if base[k] != v}
    assert diff == change, name
  with pytest.raises(ValueError, match='Unknown ablation'):
    ablation_configs.get_config('no_such_thing')


def test_digits_lighting_is_a_brightness_change(tmp_path):
  stats = data_stats.load_stats(ablations.pca_file(ablation_configs.get_config(), str(tmp_path)))
  # Grey pixels: one non-zero eigenvalue, its eigenvector along (1, 1, 1).
  assert stats['eigval'][0] > 0 and np.all(stats['eigval'][1:] < 1e-6 * stats['eigval'][0])
  np.testing.assert_allclose(np.abs(stats['eigvec'][:, 0]), np.full(3, 3 ** -0.5), atol=1e-5)


@pytest.mark.slow
def test_tiny_sweep_writes_its_table(tmp_path):
  chosen = {n: ablation_configs.get_config(n) for n in ('baseline', 'no_dropout', 'one_column')}
  result = ablations.run_ablations(chosen, [0, 1], 1, workdir=str(tmp_path), overrides=TINY)
  for name in ('baseline', 'no_dropout'):
    errs = [r['top1_error'] for r in result['runs'][name]]
    assert len(errs) == 2
    for r in result['runs'][name]:  # each run's own record of its final evaluation (64 digits)
      final = [e for e in metrics_lib.read_jsonl(os.path.join(r['workdir'], 'metrics.jsonl'))
               if 'eval/top1_error' in e][-1]
      assert (r['top1_error'], r['top5_error']) == (final['eval/top1_error'],
                                                    final['eval/top5_error'])
      assert final['eval/num_examples'] == 64 and final['step'] == TINY['num_train_steps']
    s = result['summary'][name]
    assert s['mean_top1_error'] == pytest.approx(np.mean(errs))
    assert s['std_top1_error'] == pytest.approx(np.std(errs, ddof=1))
  assert result['summary']['baseline']['vs_baseline'] == 0
  table = ablations.markdown_table(
      result, {n: what for n, (what, _) in ablation_configs.ABLATIONS.items()},
      ablation_configs.PAPER_EFFECTS)
  assert table.count('\n') >= 3 and '`no_dropout`' in table and '+1.4% top-1' not in table
  assert len(result['runs']['one_column']) == 2 and '`one_column`' in table
  assert all(ablation_configs.get_config(n).model in models.VARIANTS
             for n in ablation_configs.ABLATIONS)
  # Finished runs are read back, not retrained.
  mtime = os.path.getmtime(tmp_path / 'baseline' / 'seed0' / 'metrics.jsonl')
  again = ablations.run_ablations({'baseline': chosen['baseline']}, [0], 1,
                                  workdir=str(tmp_path), overrides=TINY)
  assert again['runs']['baseline'] == result['runs']['baseline'][:1]
  assert os.path.getmtime(tmp_path / 'baseline' / 'seed0' / 'metrics.jsonl') == mtime
  json.dumps(result)  # the command writes it as JSON
