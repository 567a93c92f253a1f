"""Runs the paper's ablations (configs/ablations.py) on the digits with several seeds.

  python -m alexnet_jax.paper.ablations --seeds=3 --epochs=10 --output=ablations.json \
      --markdown [--names=baseline,no_lrn,...] [--workdir=runs/ablations] \
      [--ablations=configs/ablations.py]

Every (ablation, seed) is a full `train.train_and_evaluate` run with the same budget; the table
gives the mean and standard deviation over seeds of the final top-1 error on the 360 held-out
digits, and the difference to the baseline. About 30-45 s per 10-epoch run on a 2-core CPU (six
ablations x 3 seeds: about 12 minutes); the log names each run and shows its progress. A workdir
that already finished its run is read back, not retrained (with --workdir; without it, temporary
workdirs are used and deleted). The ablations, what each removes and the paper's effects come
from the config module --ablations (ABLATIONS, PAPER_EFFECTS, get_config(name)).
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import os
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

import ml_collections

from alexnet_jax import cli
from alexnet_jax import paths
from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import train
from alexnet_jax.data import pipeline as input_pipeline
from alexnet_jax.data import stats as data_stats
from alexnet_jax.errors import UserError

PCA_FILENAME = 'digits_pca.npz'
# The learning rate is divided by 10 at this fraction of the budget, as configs/digits.py does at
# epoch 15 of 20.
LR_DECAY_FRACTION = 0.75


def pca_file(baseline: ml_collections.ConfigDict, directory: str) -> str:
  """The digits' own RGB eigen-statistics (§4.1), computed once into `directory`."""
  path = os.path.join(directory, PCA_FILENAME)
  if not os.path.exists(path):
    data_stats.save_stats(path, data_stats.compute_stats(baseline, 0))
  return path


def ablation_config(ablation: ml_collections.ConfigDict, seed: int, epochs: int, pca_path: str,
                    overrides: dict[str, Any] | None = None):
  """An ablation's config with this sweep's seed, budget and PCA statistics."""
  c = ablation.copy_and_resolve_references()
  c.seed = seed
  c.num_epochs = epochs
  c.lr_decay_epochs = (max(1, round(LR_DECAY_FRACTION * epochs)),)
  c.eval_every_epochs = epochs  # one evaluation, at the end: the number the table reports
  c.checkpoint_every_steps = 10**9
  c.keep_checkpoints = 1
  c.pca_file = pca_path
  c.update(overrides or {})
  return c


def _total_steps(config) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  info = input_pipeline.get_dataset_info(config)
  return int(config.num_epochs * input_pipeline.steps_per_epoch(config, info))


def _final_eval(workdir: str) -> dict[str, float] | None:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  evals = [r for r in metrics_lib.read_jsonl(path) if 'eval/top1_error' in r]
  return evals[-1] if evals else None


def run_ablations(ablations: dict[str, ml_collections.ConfigDict], seeds: Sequence[int],
                  epochs: int, *, workdir: str | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains every ablation (name -> config; 'baseline' first if present) with every seed.

  Returns {'epochs', 'seeds', 'runs': {name: [{'seed', 'top1_error', 'top5_error', 'workdir'}]},
  'summary': summarise(runs), 'seconds'}. `overrides` are applied to every run's config (the
  tests use them to shrink the runs). Every config is checked before the first run starts.
  """
  if not ablations:
    raise UserError('No ablations to run: name some with --names.')
  for config in ablations.values():
    train.prepare(config)
  with tempfile.TemporaryDirectory(prefix='alexnet_ablations_') as tmp:
    root = os.path.abspath(os.path.expanduser(workdir)) if workdir else tmp
    os.makedirs(root, exist_ok=True)
    pca_path = pca_file(next(iter(ablations.values())), root)
    runs, start = {}, time.time()
    todo = [(n, s) for n in ablations for s in seeds]
    for i, (name, seed) in enumerate(todo):
      run_dir = os.path.join(root, name, f'seed{seed}')
      config = ablation_config(ablations[name], seed, epochs, pca_path, overrides)
      done = _final_eval(run_dir)
      if done is None or done['step'] < _total_steps(config):
        logging.info('[%d/%d] %s, seed %d (%.0f s so far)', i + 1, len(todo), name, seed,
                     time.time() - start)
        train.train_and_evaluate(config, run_dir)
        done = _final_eval(run_dir)
      runs.setdefault(name, []).append({'seed': seed, 'top1_error': done['eval/top1_error'],
                                        'top5_error': done['eval/top5_error'],
                                        'workdir': run_dir if workdir else None})
  return {'epochs': epochs, 'seeds': list(seeds), 'runs': runs,
          'summary': summarise(runs), 'seconds': time.time() - start}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
  """Mean and (sample) standard deviation of the top-1 error of each ablation over its seeds."""
  out = {}
  for name, rs in runs.items():
    errs = np.array([r['top1_error'] for r in rs])
    out[name] = {'mean_top1_error': float(errs.mean()),
                 'std_top1_error': float(errs.std(ddof=1)) if len(errs) > 1 else 0.0,
                 'num_seeds': len(errs)}
  base = out.get('baseline')
  for stats in out.values():
    stats['vs_baseline'] = stats['mean_top1_error'] - base['mean_top1_error'] if base else None
  return out


def markdown_table(result: dict[str, Any], removes: dict[str, str],
                   paper_effects: dict[str, str]) -> str:
  """The summary as a Markdown table: what each ablation removes, and the paper's ImageNet
  effect beside it (both by ablation name)."""
  lines = [f'| ablation | removes | digits top-1 error (mean ± std, {len(result["seeds"])} '
           f'seeds, {result["epochs"]} epochs) | vs baseline | paper (ImageNet) |',
           '|---|---|---|---|---|']
  for name, what in removes.items():
    paper = paper_effects.get(name, '')
    if name not in result['summary']:
      continue
    s = result['summary'][name]
    diff = '' if name == 'baseline' or s['vs_baseline'] is None else (
        f'{100 * s["vs_baseline"]:+.2f}%')
    err = f'{100 * s["mean_top1_error"]:.2f}% ± {100 * s["std_top1_error"]:.2f}%'
    lines.append(f'| `{name}` | {what} | {err} | {diff} | {paper} |')
  return '\n'.join(lines)


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  flags.DEFINE_string('ablations', cli.checkout_config('ablations.py'),
                      'Config module with ABLATIONS, PAPER_EFFECTS and get_config(name).')
  flags.DEFINE_integer('seeds', 3, 'Seeds per ablation (0, 1, ..., seeds - 1).')
  flags.DEFINE_integer('epochs', 10, 'Training epochs per run.')
  flags.DEFINE_list('names', None, 'Ablations to run (default: all of --ablations).')
  flags.DEFINE_string('workdir', None, 'Keep the runs in WORKDIR/<name>/seed<k> (and reuse '
                      'finished ones); default: temporary directories.')
  flags.DEFINE_string('output', 'ablations.json', 'JSON file for all results.')
  flags.DEFINE_bool('markdown', False, 'Also print the table as Markdown.')
  flags.DEFINE_integer('num_train_steps', -1, '>0: stop each run after this many steps (smoke '
                       'tests).')


def main(argv: Sequence[str]) -> None:
  """Runs the sweep, writes --output and prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  module = cli.load_config_module(f.ablations)
  names = f.names or list(module.ABLATIONS)
  unknown = [n for n in names if n not in module.ABLATIONS]
  if unknown:
    raise UserError(f'--names: unknown ablations {unknown}; choose from '
                    f'{sorted(module.ABLATIONS)}')
  if f.seeds < 1 or f.epochs < 1:
    raise UserError(f'--seeds={f.seeds} and --epochs={f.epochs}: both must be at least 1.')
  cli.prepare_output(f.output)
  overrides = {'num_train_steps': f.num_train_steps} if f.num_train_steps > 0 else None
  result = run_ablations({n: module.get_config(n) for n in names}, range(f.seeds), f.epochs,
                         workdir=f.workdir, overrides=overrides)
  result['markdown'] = markdown_table(
      result, {n: what for n, (what, _) in module.ABLATIONS.items()}, module.PAPER_EFFECTS)
  paths.write_json(f.output, result)
  for name, s in result['summary'].items():
    print(f'{name:<22} top-1 error {100 * s["mean_top1_error"]:6.2f}% ± '
          f'{100 * s["std_top1_error"]:.2f}% over {s["num_seeds"]} seeds')
  if f.markdown:
    print(result['markdown'])
  print(f'Wrote {f.output}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
