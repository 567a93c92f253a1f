"""The paper's Figures 3 and 4 for any trained workdir.

  python -m alexnet_jax.paper.figures filters --workdir=DIR --output=conv1.png
  python -m alexnet_jax.paper.figures predictions --workdir=DIR --output=pred.png \
      [--num_images=8]
  python -m alexnet_jax.paper.figures neighbours --workdir=DIR --output=nn.png [--num_queries=5] \
      [--max_train_images=N]

- filters (Figure 3, §6.1): the conv1 kernels, one tile per kernel, each min-max normalised to
  0..1. A network whose conv2 is split into two columns (§3.2) shows the two halves of conv1's
  kernels in separate blocks, the first column's (the paper's "GPU 1") above the second's: conv2's
  first column sees only the first half of conv1's output channels.
- predictions (Figure 4, left): validation images with their true class and the five most
  probable classes as bars.
- neighbours (Figure 4, right): validation images beside the six training images whose FC7
  activations (the last hidden layer) are nearest in Euclidean distance, found by brute force.


The run is opened read-only; images go through the evaluation's preprocessing
(`augment.eval_patches`) and probabilities (`steps.probabilities`). Figures are drawn on
matplotlib `Figure` objects, without pyplot, so no global backend is chosen.
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import os
import time
from typing import Any, Iterable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf

from alexnet_jax import cli
from alexnet_jax.core import models
from alexnet_jax.core import run as run_lib
from alexnet_jax.data import augment
from alexnet_jax.data import sources as data_sources
from alexnet_jax.paper import predict

NUM_NEIGHBOURS = 6  # §6.1 / Figure 4: the six nearest training images.
_BATCH = 256
_SAMPLE_SEED = 0  # which training images a capped neighbour search looks at (fixed).

# ---------------------------------------------------------------------------- Figure 3


def normalise_tile(kernel: np.ndarray) -> np.ndarray:
  """One kernel [kh, kw, 3] min-max scaled to 0..1 (a constant kernel becomes 0.5 grey)."""
  lo, hi = float(kernel.min()), float(kernel.max())
  if hi == lo:
    return np.full(kernel.shape, 0.5, np.float32)
  return ((kernel - lo) / (hi - lo)).astype(np.float32)


def column_blocks(variant: str) -> int:
  """How many blocks conv1's kernels fall into: 2 if conv2 is split into two columns (§3.2)."""
  return models.conv_specs(variant)[1].columns


def filter_grid(kernel: np.ndarray, *, blocks: int = 1, columns: int | None = None,
                pad: int = 1, gap: int = 4) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Tiles the kernels of an HWIO conv1 kernel [kh, kw, 3, N] into one RGB image.

  The N kernels are cut into `blocks` consecutive groups (the columns of §3.2), stacked
  vertically `gap` pixels apart; inside a block, `columns` tiles per row, `pad` pixels apart.
  Returns the canvas [H, W, 3] (background 1, white) and the top-left (row, col) of each tile, in
  kernel order; tile i is `normalise_tile(kernel[..., i])`.
  """
  kh, kw, cin, n = kernel.shape
  if cin != 3:
    raise ValueError(f'Expected an RGB conv1 kernel [kh, kw, 3, N], got {kernel.shape}')
  if n % blocks:
    raise ValueError(f'{n} kernels do not split into {blocks} blocks')
  per_block = n // blocks
  if columns is None:  # about twice as wide as tall, as in Figure 3; full rows if possible
    columns = int(np.ceil(np.sqrt(per_block * 2)))
    columns = next((c for c in range(columns, per_block + 1) if per_block % c == 0), columns)
  rows = -(-per_block // columns)
  block_h = rows * (kh + pad) - pad
  canvas = np.ones((blocks * block_h + (blocks - 1) * gap, columns * (kw + pad) - pad, 3),
                   np.float32)
  positions = []
  for i in range(n):
    b, j = divmod(i, per_block)
    r, c = divmod(j, columns)
    top, left = b * (block_h + gap) + r * (kh + pad), c * (kw + pad)
    canvas[top:top + kh, left:left + kw] = normalise_tile(kernel[..., i])
    positions.append((top, left))
  return canvas, positions


def plot_filters(workdir: str, output: str, *, which: str = 'best') -> dict[str, Any]:
  """Figure 3: writes the conv1 kernels of `workdir`'s checkpoint to `output` (PNG)."""
  run = run_lib.open_run(workdir)
  config = run.config
  restored = run.restore(which=which)
  step = restored.step
  kernel = np.asarray(restored.params['conv1']['kernel'])
  blocks = column_blocks(config.model)
  columns = 16 if kernel.shape[-1] == 96 else None  # the paper's 96: two blocks of 3 x 16
  canvas, _ = filter_grid(kernel, blocks=blocks, columns=columns)
  scale = max(1, 400 // canvas.shape[1])  # nearest-neighbour upscaling keeps pixels sharp
  fig = Figure(figsize=(canvas.shape[1] * scale / 100 + 0.4,
                       canvas.shape[0] * scale / 100 + 0.7), dpi=100)
  ax = fig.subplots()
  ax.imshow(canvas, interpolation='nearest')
  ax.set_axis_off()
  title = f'{kernel.shape[-1]} conv1 kernels {kernel.shape[0]}x{kernel.shape[1]}x3, step {step}'
  if blocks == 2:
    title += '\ncolumn 1 (top), column 2 (bottom)'
  ax.set_title(title, fontsize=8)
  _save(fig, output)
  return {'num_kernels': kernel.shape[-1], 'blocks': blocks, 'step': step}


# ---------------------------------------------------------------------------- data


def _load_examples(config, split: str, max_examples: int | None,
                   sample: bool) -> tuple[tf.data.Dataset, int, str]:
  """Batches of {'square', 'label', 'index'} of `split` and how many; and how they were chosen.

  Indexed splits (digits, folders, cached TFDS) are read by index: all of them, or evenly spaced
  (sample=False) or seeded random (sample=True) ones when capped; streamed splits: the first
  max_examples records in their stored (shuffled once by TFDS) order.
  """
  source = data_sources.open_split(config, split)
  n = source.num_examples
  if max_examples and 0 < max_examples < n:
    n = max_examples

  def spread(total: int, k: int) -> np.ndarray:
    if k >= total:
      return np.arange(k, dtype=np.int64)
    if sample:
      return np.sort(np.random.RandomState(_SAMPLE_SEED).permutation(total)[:k])
    return np.linspace(0, total - 1, k).round().astype(np.int64)

  ds, indices = source.sample(n, spread)
  if indices is None:
    how = 'first {} in the stored order' if n < source.num_examples else 'all {}'
  elif n >= source.num_examples:
    how = 'all {}'
  elif sample:
    how = 'a random sample (seed 0) of {} of ' + str(source.num_examples)
  else:
    how = '{} evenly spaced of ' + str(source.num_examples)
  return ds.batch(_BATCH).prefetch(2), n, how.format(n) + f' images of {split!r}'


def _network_batches(ds: tf.data.Dataset, mean: np.ndarray | None,
                     image_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Adds the un-augmented central patch minus the mean ('image'), as evaluation sees it."""
  fn = lambda sq: augment.eval_patches(sq, mean, image_size, ten_crop=False)
  for batch in ds.map(lambda b: {**b, 'image': tf.map_fn(fn, b['square'])}).as_numpy_iterator():
    yield batch


# ---------------------------------------------------------------------------- Figure 4, left


def plot_predictions(workdir: str, output: str, *, num_images: int = 8, split: str | None = None,
                     which: str = 'best') -> dict[str, Any]:
  """Figure 4 (left): evenly spaced validation images, their true class and top-5 bars."""
  run = run_lib.open_run(workdir)
  config = run.config
  names = run.class_names()
  mean = run.mean()
  restored = run.restore(which=which)
  step = restored.step
  split = split or config.eval_split
  ds, _, how = _load_examples(config, split, num_images, sample=False)
  batch = next(_network_batches(ds, mean, config.image_size))
  labels, probs = predict.top_k(predict.class_probabilities(restored.model, restored.params,
                                                            batch['image']))
  n = len(batch['label'])
  cols = min(n, 4)
  rows = -(-n // cols)
  fig = Figure(figsize=(2.4 * cols, 3.4 * rows), dpi=100)
  grid = fig.add_gridspec(rows, cols, hspace=0.3, wspace=0.55)
  for i in range(n):
    cell = grid[divmod(i, cols)].subgridspec(2, 1, height_ratios=[1.5, 1], hspace=0.05)
    ax = fig.add_subplot(cell[0])
    ax.imshow(_display(batch['square'][i], config.image_size), interpolation='nearest')
    ax.set_axis_off()
    ax.set_title(names[batch['label'][i]], fontsize=9)
    bars = fig.add_subplot(cell[1])
    colours = ['tab:red' if lab == batch['label'][i] else 'tab:blue' for lab in labels[i]]
    bars.barh(range(len(labels[i]))[::-1], probs[i], color=colours)
    bars.set_yticks(range(len(labels[i]))[::-1], [names[x] for x in labels[i]], fontsize=8)
    for y, p in zip(range(len(labels[i]))[::-1], probs[i]):
      text = f'{100 * p:.1f}%' if p >= 1e-3 else '<0.1%'
      bars.text(min(p, 0.6) + 0.02, y, text, va='center', fontsize=7)
    bars.set_xlim(0, 1)
    bars.tick_params(axis='x', labelsize=7)
  fig.suptitle(f'Top-5 predictions, step {step} ({how}); true class above, in red if ranked',
               fontsize=9)
  _save(fig, output)
  return {'step': step, 'labels': batch['label'], 'top5': labels, 'probabilities': probs}


# ---------------------------------------------------------------------------- Figure 4, right


def nearest_neighbours(queries: np.ndarray, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                       k: int = NUM_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray, int]:
  """Exact k nearest rows in Euclidean distance, by brute force over streamed batches.

  Args:
    queries: [Q, D] feature vectors.
    batches: (features [B, D], ids [B]) pairs; every row is compared with every query on the
      device, and a running top-k is kept, so the searched set never has to fit in memory.
    k: neighbours per query.
  Returns:
    ids [Q, k] and distances [Q, k], nearest first, and the number of rows searched.
  """
  q = jnp.asarray(queries, jnp.float32)

  @jax.jit
  def merge(best_d, best_i, feats, ids, valid):
    # Differences, not |q|^2 - 2 q.t + |t|^2: that form loses the small distances of near
    # duplicates to cancellation in float32.
    d = jnp.sum(jnp.square(q[:, None, :] - feats[None, :, :]), axis=-1)
    d = jnp.where(valid[None, :], d, jnp.inf)
    all_d = jnp.concatenate([best_d, d], axis=1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, d.shape)], axis=1)
    neg, pos = jax.lax.top_k(-all_d, k)
    return -neg, jnp.take_along_axis(all_i, pos, axis=1)

  best_d = jnp.full((q.shape[0], k), jnp.inf)
  best_i = jnp.full((q.shape[0], k), -1, jnp.int32)
  searched, size = 0, None
  for feats, ids in batches:
    m = len(ids)
    size = size or m  # pad later batches to the first one's size: one compilation
    pad = max(size - m, 0)
    valid = np.arange(m + pad) < m
    feats = np.pad(np.asarray(feats, np.float32), ((0, pad), (0, 0)))
    ids = np.pad(np.asarray(ids, np.int32), (0, pad), constant_values=-1)
    best_d, best_i = merge(best_d, best_i, feats, ids, valid)
    searched += m
  if searched < k:
    raise ValueError(f'Only {searched} rows to search; need at least {k}.')
  return np.asarray(best_i), np.sqrt(np.asarray(best_d)), searched


def find_neighbours(workdir: str, *, num_queries: int = 5, max_train_images: int | None = None,
                    split: str | None = None, which: str = 'best') -> dict[str, Any]:
  """Validation queries and their NUM_NEIGHBOURS nearest training images by FC7 distance."""
  run = run_lib.open_run(workdir)
  config = run.config
  mean = run.mean()
  restored = run.restore(which=which)
  model, params, step = restored.model, restored.params, restored.step
  names = run.class_names()
  fc7 = jax.jit(lambda p, x: models.fc7_features(model, p, x))
  query_ds, _, _ = _load_examples(config, split or config.eval_split, num_queries, sample=False)
  queries = next(_network_batches(query_ds, mean, config.image_size))
  train_ds, total, how = _load_examples(config, config.train_split, max_train_images, sample=True)
  logging.info('Searching the FC7 features of %s by brute force', how)
  squares, labels, start = {}, {}, time.time()

  def feature_batches():
    done = 0
    for batch in _network_batches(train_ds, mean, config.image_size):
      for i, idx in enumerate(batch['index']):  # kept for the figure: only the images shown
        squares[int(idx)], labels[int(idx)] = batch['square'][i], int(batch['label'][i])
      done += len(batch['index'])
      logging.info('  %d/%d training images (%.1f s)', done, total, time.time() - start)
      yield fc7(params, batch['image']), batch['index']

  ids, dists, searched = nearest_neighbours(fc7(params, queries['image']), feature_batches())
  return {'step': step, 'class_names': names, 'queries': queries, 'ids': ids, 'distances': dists,
          'searched': searched, 'how': how,
          'neighbour_squares': [[squares[int(i)] for i in row] for row in ids],
          'neighbour_labels': [[labels[int(i)] for i in row] for row in ids],
          'image_size': config.image_size}


def plot_neighbours(workdir: str, output: str, **kwargs) -> dict[str, Any]:
  """Figure 4 (right): writes each query beside its six nearest training images to `output`."""
  found = find_neighbours(workdir, **kwargs)
  names = found['class_names']
  q = len(found['ids'])
  fig = Figure(figsize=(1.3 * (NUM_NEIGHBOURS + 1), 1.45 * q), dpi=100)
  axes = fig.subplots(q, NUM_NEIGHBOURS + 1, squeeze=False)
  size = found['image_size']
  for r in range(q):
    axes[r, 0].imshow(_display(found['queries']['square'][r], size), interpolation='nearest')
    axes[r, 0].set_title(f'query: {names[found["queries"]["label"][r]]}', fontsize=7,
                         color='tab:red')
    for c in range(NUM_NEIGHBOURS):
      axes[r, c + 1].imshow(_display(found['neighbour_squares'][r][c], size),
                            interpolation='nearest')
      axes[r, c + 1].set_title(f'{names[found["neighbour_labels"][r][c]]}  '
                               f'd={found["distances"][r, c]:.3g}', fontsize=6)
  for ax in axes.ravel():
    ax.set_axis_off()
  fig.suptitle(f'Six nearest training images by Euclidean FC7 distance (step {found["step"]});\n'
               f'brute force over {found["how"]}, centre crops, no augmentation', fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  _save(fig, output)
  logging.info('Searched %d training images (%s).', found['searched'], found['how'])
  return found


# ---------------------------------------------------------------------------- helpers


def _display(square: np.ndarray, image_size: int) -> np.ndarray:
  """The central patch the network sees, without the mean, on 0..1 for imshow."""
  crop = augment.center_crop(tf.constant(square), image_size).numpy()
  return np.clip(crop / augment.PIXEL_MAX, 0.0, 1.0)


def _save(fig, output: str) -> None:
  directory = os.path.dirname(os.path.abspath(output))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(output, bbox_inches='tight')
  logging.info('Wrote %s', output)


COMMANDS = ('filters', 'predictions', 'neighbours')


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
  flags.DEFINE_string('output', None, 'PNG file to write.')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint to use.')
  flags.DEFINE_string('split', None, 'Validation split (default: the run\'s eval_split).')
  flags.DEFINE_integer('num_images', 8, 'predictions: how many validation images.')
  flags.DEFINE_integer('num_queries', 5, 'neighbours: how many validation images.')
  flags.DEFINE_integer('max_train_images', 20_000,
                       'neighbours: search at most this many training images (0: all).')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv: Sequence[str]) -> None:
  """Dispatches to one of COMMANDS."""
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError('Name one figure: python -m alexnet_jax.paper.figures '
                         f'{{{",".join(COMMANDS)}}} --workdir=DIR --output=FILE.png')
  f = flags.FLAGS
  cli.prepare_output(f.output)
  if argv[1] == 'filters':
    plot_filters(f.workdir, f.output, which=f.checkpoint)
  elif argv[1] == 'predictions':
    plot_predictions(f.workdir, f.output, num_images=f.num_images, split=f.split,
                     which=f.checkpoint)
  else:
    plot_neighbours(f.workdir, f.output, num_queries=f.num_queries,
                    max_train_images=f.max_train_images, split=f.split, which=f.checkpoint)
  print(f'Wrote {f.output}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
