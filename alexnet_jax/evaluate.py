"""§6's evaluation of trained networks: top-1/top-5 error, centre crop and 10 crops, and ensembles.

  python -m alexnet_jax.evaluate --workdirs=runs/a,runs/b,runs/c [--split=validation] \
      [--checkpoint=best] [--output=results.json]

For each workdir and for the average of their softmax outputs (the paper's "five CNNs" of §6,
whose averaged predictions gave 38.1% against one CNN's 40.7% top-1 on ILSVRC-2012 validation),
reports the errors with the central patch and with §4.1's 10-crop test. Every example of the
split counts once: the padded examples of the last batch are masked out. Each workdir is
preprocessed with its own config (image size, mean), so differently shaped runs can be combined
as long as they were trained on the same classes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from alexnet_jax import steps
from alexnet_jax import train

CROP_SETTINGS = {'center_crop': False, 'ten_crop': True}  # name -> eval_iterator's ten_crop
ENSEMBLE = 'ensemble'


def predict_split(model, params: Any, config, *, ten_crop: bool, workdir: str | None,
                  split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Softmax outputs [N, classes] and labels [N] of every example of `split`, in split order.

  N is the number of (readable) examples: the padding of the last batch is dropped by its mask.
  `params` are host (unreplicated) parameters; the batches are spread over the local devices.
  """
  p_probs = jax.pmap(lambda p, x: steps.probabilities(p, x, model=model))
  rparams = steps.replicate(params)
  name = split or config.eval_split
  # For the progress log only (one process's share is about this many batches).
  total = math.ceil(data_sources.open_split(config, name).num_examples / config.eval_batch_size)
  probs, labels = [], []
  start = time.time()
  it = input_pipeline.eval_iterator(config, split=name, ten_crop=ten_crop, workdir=workdir)
  try:
    for i, batch in enumerate(it):
      out = np.asarray(p_probs(rparams, steps.shard({'image': batch['image']})['image']))
      out = out.reshape((-1, out.shape[-1]))
      probs.append(out[batch['mask']])
      labels.append(batch['label'][batch['mask']])
      if (i + 1) % max(1, total // 10) == 0 or i + 1 == total:
        logging.info('  %s: batch %d/%d (%.1f s)', 'ten crops' if ten_crop else 'centre crop',
                     i + 1, total, time.time() - start)
  finally:
    it.close()
  return np.concatenate(probs).astype(np.float64), np.concatenate(labels).astype(np.int64)


def topk_error(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of examples whose label is not among the k most probable classes (§6).

  The rank of the true class is the number of classes strictly more probable, so ties count in
  its favour, as `metrics.topk_errors` does during training.
  """
  true = np.take_along_axis(probs, labels[:, None], axis=-1)
  rank = np.sum(probs > true, axis=-1)
  return float(np.mean(rank >= k))


def errors(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """{'top1_error', 'top5_error', 'num_examples'} of softmax outputs against labels."""
  return {'top1_error': topk_error(probs, labels, 1),
          'top5_error': topk_error(probs, labels, min(5, probs.shape[-1])),
          'num_examples': int(len(labels))}


def _check_same_examples(workdirs: Sequence[str], labels: Sequence[np.ndarray],
                         classes: Sequence[Any]) -> None:
  for wd, lab, cls in zip(workdirs[1:], labels[1:], classes[1:]):
    if cls != classes[0]:
      raise ValueError(f'{wd} was trained on other classes than {workdirs[0]} '
                       '(their classes.json differ): their outputs cannot be averaged.')
    if lab.shape != labels[0].shape or not np.array_equal(lab, labels[0]):
      raise ValueError(f'{wd} and {workdirs[0]} evaluate different examples ({len(lab)} and '
                       f'{len(labels[0])}, or another order): check their dataset and split.')


def _classes(workdir: str) -> Any:
  path = os.path.join(workdir, input_pipeline.CLASSES_FILENAME)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def evaluate_workdirs(workdirs: Sequence[str], *, split: str | None = None,
                      which: str = 'best',
                      crops: Sequence[str] = tuple(CROP_SETTINGS)) -> dict[str, Any]:
  """Errors of each workdir's checkpoint and of their averaged softmax outputs, per crop setting.

  Returns {'split', 'results': {workdir or 'ensemble': {crop: {'top1_error', 'top5_error',
  'num_examples'}}}, 'steps': {workdir: checkpoint step}}. The ensemble averages the class
  probabilities of all workdirs (§6); with one workdir it equals that workdir's own result.
  """
  if not workdirs:
    raise ValueError('No workdirs given: pass --workdirs=DIR1,DIR2,...')
  for crop in crops:
    if crop not in CROP_SETTINGS:
      raise ValueError(f'Unknown crop setting {crop!r}; choose from {tuple(CROP_SETTINGS)}')
  unique = list(dict.fromkeys(os.path.abspath(os.path.expanduser(w)) for w in workdirs))
  if len(unique) < len(workdirs):
    logging.warning('Workdirs named more than once are evaluated once: %s', ', '.join(unique))
  workdirs = unique
  results: dict[str, dict[str, Any]] = {w: {} for w in workdirs}
  results[ENSEMBLE] = {}
  checkpoint_steps, split_name = {}, None
  probs_by_crop: dict[str, list[np.ndarray]] = {c: [] for c in crops}
  labels = []
  for n, wd in enumerate(workdirs):
    config = train.load_config(wd)
    model, params, step = train.load_trained(config, wd, which=which)
    checkpoint_steps[wd] = step
    split_name = split or config.eval_split
    for crop in crops:
      logging.info('[%d/%d] %s (step %d), %s, %s', n + 1, len(workdirs), wd, step, split_name,
                   crop)
      probs, lab = predict_split(model, params, config, ten_crop=CROP_SETTINGS[crop],
                                 workdir=wd, split=split_name)
      probs_by_crop[crop].append(probs)
      results[wd][crop] = errors(probs, lab)
    labels.append(lab)
  _check_same_examples(workdirs, labels, [_classes(w) for w in workdirs])
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
  train.console_logging()
  f = flags.FLAGS
  report = evaluate_workdirs(f.workdirs or [], split=f.split, which=f.checkpoint, crops=f.crops)
  print(format_table(report))
  if f.output:
    with open(f.output, 'w', encoding='utf-8') as out:
      json.dump(report, out, indent=2)
    print(f'Wrote {f.output}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
