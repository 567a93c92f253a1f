"""The five most probable classes of image files, as a trained network sees them (§6, Figure 4).

  python -m alexnet_jax.predict --workdir=runs/digits image1.png [image2.jpg ...] [--ten_crop]

Each file gets the evaluation's preprocessing exactly: §2's square (short side resized to
config.resize_size, central patch), minus the run's mean (workdir/data_stats.npz), then the
central config.image_size patch, or §4.1's ten patches whose softmax outputs are averaged.
Class names come from workdir/classes.json, written by the training run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
import tensorflow as tf

from alexnet_jax import augment
from alexnet_jax import data_sources
from alexnet_jax import input_pipeline
from alexnet_jax import train

TOP_K = 5  # §6: the paper reports and shows (Figure 4) the five most probable labels.


class ImageReadError(ValueError):
  """An image file is missing or cannot be decoded; the message names the path."""


def class_names(workdir: str) -> list[str]:
  """Names of the labels 0..C-1 of a run, from workdir/classes.json ({name: label})."""
  path = os.path.join(os.path.expanduser(workdir), input_pipeline.CLASSES_FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: the run in {workdir} never read its data. '
                            'Train it with `python main.py --config=... --workdir=...`.')
  with open(path, encoding='utf-8') as f:
    mapping = json.load(f)
  names = [''] * len(mapping)
  for name, label in mapping.items():
    names[int(label)] = name
  return names


def mean_to_subtract(config, workdir: str | None) -> np.ndarray | None:
  """What the run subtracts from every square image (§2): its mean image or RGB mean, or None."""
  # The input pipeline's own function, so files and evaluation batches cannot drift apart.
  return input_pipeline.mean_for(config, workdir)


def read_square(path: str, config) -> np.ndarray:
  """§2's square image of a file: float32 [R, R, 3], 0..255, R = config.resize_size."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ImageReadError(f'{path}: no such file. Pass the path of a JPEG, PNG, GIF or BMP image.')
  try:
    encoded = tf.io.read_file(path)
    square = data_sources.decode_center_square(encoded, config.resize_size,
                                               config.get('resize_antialias', True))
    return square.numpy()
  except (tf.errors.OpError, ValueError) as e:
    raise ImageReadError(f'{path} cannot be decoded as an image ({type(e).__name__}); pass a '
                         'JPEG, PNG, GIF or BMP file.') from e


def network_input(square: np.ndarray, mean: np.ndarray | None, image_size: int,
                  ten_crop: bool) -> np.ndarray:
  """The evaluation's patches of a square image: [S, S, 3] (centre) or [10, S, S, 3] (§4.1)."""
  image = tf.constant(square, tf.float32)
  if mean is not None:
    image = image - mean
  if ten_crop:
    return augment.ten_crop(image, image_size).numpy()
  return augment.center_crop(image, image_size).numpy()


def class_probabilities(model, params: Any, images: np.ndarray) -> np.ndarray:
  """Softmax outputs [N, C] of images [N, S, S, 3], or [N, 10, S, S, 3] averaged over crops."""
  images = np.asarray(images, np.float32)
  crops = images.shape[1] if images.ndim == 5 else 1
  flat = images.reshape((-1,) + images.shape[-3:])
  probs = jax.jit(lambda p, x: jax.nn.softmax(model.apply({'params': p}, x)))(params, flat)
  return np.asarray(probs, np.float64).reshape(images.shape[0], crops, -1).mean(axis=1)


def top_k(probs: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
  """(labels [N, k], probabilities [N, k]) of the k most probable classes, most probable first."""
  k = min(k, probs.shape[-1])
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return order, np.take_along_axis(probs, order, axis=-1)


def predict_files(workdir: str, paths: Sequence[str], *, ten_crop: bool = False,
                  which: str = 'best') -> list[dict[str, Any]]:
  """Top-5 classes of each image file under the checkpoint of `workdir`.

  Returns one {'path', 'labels', 'classes', 'probabilities'} per path, most probable first.
  Raises ImageReadError naming the first unreadable file before any network work.
  """
  config = train.load_config(workdir)
  names = class_names(workdir)
  squares = [read_square(p, config) for p in paths]  # fail on a bad file before loading weights
  model, params, step = train.load_trained(config, workdir, which=which)
  logging.info('Checkpoint of step %d from %s; %s', step, workdir,
               'ten crops averaged' if ten_crop else 'centre crop')
  mean = mean_to_subtract(config, workdir)
  images = np.stack([network_input(s, mean, config.image_size, ten_crop) for s in squares])
  labels, probs = top_k(class_probabilities(model, params, images))
  return [{'path': p, 'labels': [int(x) for x in lab], 'classes': [names[x] for x in lab],
           'probabilities': [float(x) for x in pr]} for p, lab, pr in zip(paths, labels, probs)]


def format_predictions(predictions: Sequence[dict[str, Any]]) -> str:
  """One block per image: its path, then `probability  class name (label)` lines."""
  lines = []
  for pred in predictions:
    lines.append(pred['path'])
    for label, name, prob in zip(pred['labels'], pred['classes'], pred['probabilities']):
      # Tiny probabilities in scientific notation: a confident net's 0.00% hides the ranking.
      text = f'{100 * prob:6.2f}%' if prob >= 1e-4 else f'{100 * prob:.1e}%'
      lines.append(f'  {text:>8}  {name} ({label})')
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
    raise app.UsageError('Name at least one image: python -m alexnet_jax.predict '
                         '--workdir=DIR IMAGE [IMAGE ...]')
  train.console_logging()
  f = flags.FLAGS
  try:
    predictions = predict_files(f.workdir, paths, ten_crop=f.ten_crop, which=f.checkpoint)
  except (ImageReadError, FileNotFoundError) as e:
    raise SystemExit(f'Error: {e}') from None
  print(format_predictions(predictions))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
