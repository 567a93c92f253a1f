"""The five most probable classes of image files, as a trained network sees them (§6, Figure 4).

  python -m alexnet_jax.paper.predict --workdir=runs/digits image1.png [image2.jpg ...] \
      [--ten_crop]

Each file gets the evaluation's preprocessing exactly (`augment.eval_patches`): §2's square
(short side resized to config.resize_size, central patch), minus the run's mean, then the
central config.image_size patch, or §4.1's ten patches whose softmax outputs are averaged
(`steps.probabilities`). Class names come from the run's classes.json. The run is opened
read-only.

A file that cannot be read (missing, unreadable, empty, truncated, not an image) does not stop
the others: it is skipped, logged with the reason, and keeps its place in the output, as
`path` then `  skipped: <reason>` in the printed text and as {'path', 'error': reason} among
`predict_files`' records (JSON-ready, one per path in the order given); a last line counts the
skipped files. Only when no file can be read is it an error (exit status 2).
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
import jax
import numpy as np
import tensorflow as tf

from alexnet_jax import cli
from alexnet_jax.core import metrics
from alexnet_jax.core import run as run_lib
from alexnet_jax.core import steps
from alexnet_jax.data import augment
from alexnet_jax.data import sources
from alexnet_jax.errors import ImageReadError

TOP_K = 5  # §6: the paper reports and shows (Figure 4) the five most probable labels.


def read_square(path: str, config) -> np.ndarray:
  """§2's square image of a file: float32 [R, R, 3], 0..255, R = config.resize_size.

  Raises ImageReadError, '<path>: <reason>', where the file is missing or cannot be decoded.
  """
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ImageReadError(f'{path}: {"not a file" if os.path.exists(path) else "no such file"}')
  try:
    encoded = tf.io.read_file(path)
    square = sources.decode_center_square(encoded, config.resize_size, config.resize_antialias)
    return square.numpy()
  except (tf.errors.OpError, ValueError) as e:
    reason = sources.unreadable_reason(e).removeprefix(f'{path}; ')
    raise ImageReadError(f'{path}: {reason}') from e


def network_input(square: np.ndarray, mean: np.ndarray | None, image_size: int,
                  ten_crop: bool) -> np.ndarray:
  """The evaluation's patches of a square image: [S, S, 3] (centre) or [10, S, S, 3] (§4.1)."""
  return augment.eval_patches(tf.constant(square, tf.float32), mean, image_size,
                              ten_crop).numpy()


def class_probabilities(model, params: Any, images: np.ndarray) -> np.ndarray:
  """`steps.probabilities` of images [N, S, S, 3], or [N, 10, S, S, 3] averaged over crops."""
  return np.asarray(jax.jit(lambda p, x: steps.probabilities(p, x, model=model))(
      params, np.asarray(images, np.float32)))


def top_k(probs: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
  """(labels [N, k], probabilities [N, k]) of the k most probable classes, most probable first."""
  labels, values = metrics.top_k(probs, k)
  return np.asarray(labels), np.asarray(values)


def predict_files(workdir: str, paths: Sequence[str], *, ten_crop: bool = False,
                  which: str = 'best') -> list[dict[str, Any]]:
  """Top-5 classes of each image file under the checkpoint of `workdir`.

  Returns one record per path, in order: {'path', 'labels', 'classes', 'probabilities'} (most
  probable first), or {'path', 'error'} for a file that cannot be read, which is skipped and
  logged. Raises ImageReadError, naming every file and why, when none can be read (before any
  network work).
  """
  run = run_lib.open_run(workdir)
  config = run.config
  names = run.class_names()
  squares, errors = {}, {}
  for i, path in enumerate(paths):  # every file read before the weights are loaded
    try:
      squares[i] = read_square(path, config)
    except ImageReadError as e:
      errors[i] = str(e).removeprefix(f'{os.path.expanduser(path)}: ')
      logging.warning('Unreadable image skipped (%d so far): %s', len(errors), e)
  if not squares:
    raise ImageReadError(f'None of the {len(paths)} files can be read as an image: ' +
                         '; '.join(f'{paths[i]}: {reason.rstrip(".")}'
                                   for i, reason in errors.items()) +
                         '. Pass JPEG, PNG, GIF or BMP files.')
  restored = run.restore(which=which)
  mean = run.mean()
  logging.info('Checkpoint of step %d from %s; %s', restored.step, run.workdir,
               'ten crops averaged' if ten_crop else 'centre crop')
  images = np.stack([network_input(s, mean, config.image_size, ten_crop)
                     for s in squares.values()])
  labels, probs = top_k(class_probabilities(restored.model, restored.params, images))
  records = [{'path': p, 'error': errors[i]} if i in errors else None
             for i, p in enumerate(paths)]
  for i, lab, pr in zip(squares, labels, probs):
    records[i] = {'path': paths[i], 'labels': [int(x) for x in lab],
                  'classes': [names[x] for x in lab], 'probabilities': [float(x) for x in pr]}
  return records


def format_predictions(predictions: Sequence[dict[str, Any]]) -> str:
  """One block per image: its path, then `probability  class name (label)` lines, or
  `skipped: <reason>`; then, if any were skipped, a line that counts them."""
  lines = []
  for pred in predictions:
    lines.append(pred['path'])
    if 'error' in pred:
      lines.append(f'  skipped: {pred["error"]}')
      continue
    for label, name, prob in zip(pred['labels'], pred['classes'], pred['probabilities']):
      # Tiny probabilities in scientific notation: a confident net's 0.00% hides the ranking.
      text = f'{100 * prob:6.2f}%' if prob >= 1e-4 else f'{100 * prob:.1e}%'
      lines.append(f'  {text:>8}  {name} ({label})')
  skipped = sum('error' in pred for pred in predictions)
  if skipped:
    lines.append(f'Skipped {skipped} of {len(predictions)} files that cannot be read as images.')
  return '\n'.join(lines)


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
  flags.DEFINE_bool('ten_crop', False, "Average the softmax of §4.1's ten patches.")
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint to use.')
  flags.mark_flags_as_required(['workdir'])


def main(argv: Sequence[str]) -> None:
  """Prints the top-5 classes of every image named on the command line."""
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Name at least one image: python -m alexnet_jax.paper.predict '
                         '--workdir=DIR IMAGE [IMAGE ...]')
  f = flags.FLAGS
  print(format_predictions(predict_files(f.workdir, paths, ten_crop=f.ten_crop,
                                         which=f.checkpoint)))


if __name__ == '__main__':
  cli.run(main, _define_flags)
