"""§6's evaluation of trained networks: top-1/top-5 error, centre crop and 10 crops, and ensembles.

  python -m alexnet_jax.paper.evaluate --workdirs=runs/a,runs/b,runs/c [--split=validation] \
      [--checkpoint=best] [--output=results.json]

For each workdir and for the average of their softmax outputs (the paper's "five CNNs" of §6,
whose averaged predictions gave 38.1% against one CNN's 40.7% top-1 on ILSVRC-2012 validation),
reports the errors with the central patch and with §4.1's 10-crop test. Every example of the
split counts once: the padded examples of the last batch are masked out. Each workdir is
preprocessed with its own config (image size, mean), so differently shaped runs can be combined
as long as they were trained on the same classes. In a run of several processes each evaluates
its share and the counts are summed over all of them. The runs are opened read-only.
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from alexnet_jax import cli
from alexnet_jax import paths
from alexnet_jax.core import evaluation
from alexnet_jax.core import run as run_lib
from alexnet_jax.errors import UserError

CROP_SETTINGS = {'center_crop': False, 'ten_crop': True}  # name -> eval_iterator's ten_crop
ENSEMBLE = 'ensemble'


def errors(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{'top1_error', 'top5_error', 'num_examples'} of class probabilities against labels, over
  every process's share (`evaluation.errors_of`: the counting of every evaluation)."""
  rates = evaluation.errors_of(probs, labels)
  return {'top1_error': rates['eval/top1_error'], 'top5_error': rates['eval/top5_error'],
          'num_examples': int(rates['eval/num_examples'])}


def _check_same_examples(workdirs: Sequence[str], labels: Sequence[np.ndarray],
                         classes: Sequence[Any]) -> None:
  for wd, lab, cls in zip(workdirs[1:], labels[1:], classes[1:]):
    if cls != classes[0]:
      raise UserError(f'{wd} was trained on other classes than {workdirs[0]} '
                       '(their classes.json differ): their outputs cannot be averaged.')
    if lab.shape != labels[0].shape or not np.array_equal(lab, labels[0]):
      raise UserError(f'{wd} and {workdirs[0]} evaluate different examples ({len(lab)} and '
                       f'{len(labels[0])}, or another order): check their dataset and split.')


def evaluate_workdirs(workdirs: Sequence[str], *, split: str | None = None,
                      which: str = 'best',
                      crops: Sequence[str] = tuple(CROP_SETTINGS)) -> dict[str, Any]:
  """Errors of each workdir's checkpoint and of their averaged softmax outputs, per crop setting.

  Returns {'split', 'results': {workdir or 'ensemble': {crop: {'top1_error', 'top5_error',
  'num_examples'}}}, 'steps': {workdir: checkpoint step}}. The ensemble averages the class
  probabilities of all workdirs (§6); with one workdir it equals that workdir's own result.
  """
  if not workdirs:
    raise UserError('No workdirs given: pass --workdirs=DIR1,DIR2,...')
  for crop in crops:
    if crop not in CROP_SETTINGS:
      raise UserError(f'Unknown crop setting {crop!r}; choose from {tuple(CROP_SETTINGS)}')
  unique = list(dict.fromkeys(os.path.abspath(os.path.expanduser(w)) for w in workdirs))
  if len(unique) < len(workdirs):
    logging.warning('Workdirs named more than once are evaluated once: %s', ', '.join(unique))
  workdirs = unique
  results: dict[str, dict[str, Any]] = {w: {} for w in workdirs}
  results[ENSEMBLE] = {}
  checkpoint_steps, split_name = {}, None
  probs_by_crop: dict[str, list[np.ndarray]] = {c: [] for c in crops}
  runs = [run_lib.open_run(wd) for wd in workdirs]  # Every workdir checked before any work.
  labels = []
  for n, (wd, run) in enumerate(zip(workdirs, runs)):
    restored = run.restore(which=which)
    mean = run.mean()
    checkpoint_steps[wd] = restored.step
    split_name = split or run.config.eval_split
    for crop in crops:
      logging.info('[%d/%d] %s (step %d), %s, %s', n + 1, len(workdirs), wd, restored.step,
                   split_name, crop)
      probs, lab = evaluation.split_probabilities(
          restored.model, restored.params, run.config, ten_crop=CROP_SETTINGS[crop], mean=mean,
          split=split_name)
      probs_by_crop[crop].append(probs)
      results[wd][crop] = errors(probs, lab)
    labels.append(lab)
  _check_same_examples(workdirs, labels, [r.class_names() for r in runs])
  for crop in crops:
    results[ENSEMBLE][crop] = errors(np.mean(probs_by_crop[crop], axis=0), labels[0])
  return {'split': split_name, 'checkpoint': which, 'results': results,
          'steps': checkpoint_steps}


def format_table(report: dict[str, Any]) -> str:
  """The errors as a fixed-width text table, one row per workdir and one for the ensemble."""
  crops = [c for c in CROP_SETTINGS if any(c in r for r in report['results'].values())]
  header = f'{"model":<40}' + ''.join(f'{c + " top-1":>18}{c + " top-5":>18}' for c in crops)
  lines = [f'{report["split"]} split, {report["checkpoint"]} checkpoints', header,
           '-' * len(header)]
  n = len(report['results']) - 1
  for name, by_crop in report['results'].items():
    label = f'average of {n} models' if name == ENSEMBLE else name
    label = label if len(label) <= 38 else '...' + label[-35:]
    row = f'{label:<40}'
    for c in crops:
      row += f'{100 * by_crop[c]["top1_error"]:>17.2f}%{100 * by_crop[c]["top5_error"]:>17.2f}%'
    lines.append(row)
  examples = next(iter(report['results'].values()))[crops[0]]['num_examples']
  lines.append(f'({examples} examples, each counted once)')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------- command line


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  flags.DEFINE_list('workdirs', None, 'Comma-separated workdirs of trained runs.')
  flags.DEFINE_string('split', None, "Split to evaluate (default: each run's config.eval_split).")
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint of each run.')
  flags.DEFINE_list('crops', list(CROP_SETTINGS), 'Crop settings: center_crop and/or ten_crop.')
  flags.DEFINE_string('output', None, 'Optional JSON file for the results.')
  flags.mark_flags_as_required(['workdirs'])


def main(argv: Sequence[str]) -> None:
  """Evaluates --workdirs, prints the table and writes --output."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.output:
    cli.prepare_output(f.output)
  report = evaluate_workdirs(f.workdirs or [], split=f.split, which=f.checkpoint, crops=f.crops)
  print(format_table(report))
  if f.output:
    paths.write_json(f.output, report)
    print(f'Wrote {f.output}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
