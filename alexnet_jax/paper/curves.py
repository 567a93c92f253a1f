"""Training and evaluation curves of a run, drawn from its metrics.jsonl.

  python -m alexnet_jax.paper.curves --workdir=DIR --output=curves.png [--title=TEXT]

Two panels against the epoch: the training loss (and the evaluation loss), and the top-1 error
of the training batches beside the evaluation's top-1 and top-5 errors. A dotted line marks the
first training record at each new learning rate. Evaluation records carry a step but no epoch:
they are placed with the run's own epochs per step, read from its training records (a run
without any is drawn against steps). The run is only read, finished or still training.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from matplotlib.figure import Figure

from alexnet_jax import cli
from alexnet_jax import paths
from alexnet_jax.core import metrics
from alexnet_jax.errors import RunError


def _value(record: dict[str, Any], key: str) -> float:
  """A metric as a float: metrics.jsonl writes NaN and infinities as strings."""
  return float(record.get(key, 'nan'))


def read_curves(workdir: str) -> dict[str, Any]:
  """The series of `workdir/metrics.jsonl`: {'x_label', 'train', 'eval', 'lr_changes'}, where
  'train' and 'eval' map each metric name to (x values, y values)."""
  path = paths.resolve(workdir) / 'metrics.jsonl'
  if not path.exists():
    raise RunError(f'{path} does not exist: --workdir must be a run (python main.py '
                   '--config=configs/digits.py --workdir=DIR writes one).')
  records = sorted(metrics.read_jsonl(str(path)), key=lambda r: r['step'])
  train = [r for r in records if 'train/loss' in r]
  evals = [r for r in records if 'eval/top1_error' in r]
  if not train and not evals:
    raise RunError(f'{path} holds no training or evaluation records yet.')
  per_step = [r['epoch'] / r['step'] for r in train if 'epoch' in r and r['step'] > 0]
  scale = per_step[-1] if per_step else 1.0  # epochs per step; 1: draw against steps
  x_label = 'epoch' if per_step else 'step'

  def series(rows, key):
    return ([r['step'] * scale for r in rows if key in r],
            [_value(r, key) for r in rows if key in r])

  lr_changes = [train[i]['step'] * scale for i in range(1, len(train))
                if 'lr' in train[i] and 'lr' in train[i - 1]
                and not math.isclose(train[i]['lr'], train[i - 1]['lr'])]
  return {'x_label': x_label,
          'train': {k: series(train, k) for k in ('train/loss', 'train/top1_error')},
          'eval': {k: series(evals, k) for k in ('eval/loss', 'eval/top1_error',
                                                 'eval/top5_error')},
          'lr_changes': lr_changes}


def plot_curves(workdir: str, output: str, title: str | None = None) -> dict[str, Any]:
  """Draws the curves of `workdir` into the PNG file `output`; returns what was drawn."""
  curves = read_curves(workdir)
  fig = Figure(figsize=(9, 3.4))
  loss_ax, error_ax = fig.subplots(1, 2)
  train, evals = curves['train'], curves['eval']
  loss_ax.plot(*train['train/loss'], '-', color='tab:blue', label='training batches')
  loss_ax.plot(*evals['eval/loss'], 'o--', color='tab:orange', label='evaluation')
  loss_ax.set_ylabel('cross-entropy loss')
  percent = lambda xy: (xy[0], [100 * y for y in xy[1]])
  error_ax.plot(*percent(train['train/top1_error']), '-', color='tab:blue',
                label='top-1, training batches')
  error_ax.plot(*percent(evals['eval/top1_error']), 'o--', color='tab:orange',
                label='top-1, evaluation')
  error_ax.plot(*percent(evals['eval/top5_error']), 's:', color='tab:green',
                label='top-5, evaluation')
  error_ax.set_ylabel('error (%)')
  for ax in (loss_ax, error_ax):
    for x in curves['lr_changes']:
      ax.axvline(x, linestyle=':', color='grey', linewidth=1)
    ax.set_xlabel(curves['x_label'])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  last = evals['eval/top1_error'][1]
  if last:
    error_ax.set_title(f'final evaluation: top-1 {100 * last[-1]:.2f}%, '
                       f'top-5 {100 * evals["eval/top5_error"][1][-1]:.2f}%', fontsize=9)
  if curves['lr_changes']:
    loss_ax.set_title('dotted: first record at a new learning rate', fontsize=9)
  fig.suptitle(title if title is not None else os.path.basename(os.path.normpath(workdir)),
               fontsize=10)
  fig.tight_layout()
  fig.savefig(output, dpi=100)
  logging.info('Wrote %s', output)
  return curves


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  flags.DEFINE_string('workdir', None, 'Workdir of a run (its metrics.jsonl is read).')
  flags.DEFINE_string('output', None, 'PNG file to write.')
  flags.DEFINE_string('title', None, 'Title of the figure (default: the workdir\'s name).')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv: Sequence[str]) -> None:
  """Writes the figure."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  cli.prepare_output(f.output)
  plot_curves(f.workdir, f.output, title=f.title)
  print(f'Wrote {f.output}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
