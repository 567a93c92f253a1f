"""Figure 1 (§3.1): how much faster a four-layer convnet trains with ReLUs than with tanh units.

  python -m alexnet_jax.paper.relu_vs_tanh --output=fig1.png [--epochs=4] \
      [--learning_rates=...] [--config=configs/digits.py]

The paper trained a four-layer convolutional network on CIFAR-10 and found that with ReLUs it
reached 25% training error six times faster than the same network with tanh units, the learning
rate of each chosen to make its training as fast as possible, with no regularisation. CIFAR-10
cannot be downloaded here, so this runs on the offline digits (configs/digits.py's data: 1,437
training images, 32x32 grey as RGB, central 28x28 patch, no augmentation); digits are far easier
than CIFAR-10, so both nets get under 25% within an epoch or two and the ratio is coarser. The
network: three 5x5 convolutions (32, 32, 64 kernels, each followed by the activation and 3x3/2
max-pooling, as in cuda-convnet's CIFAR-10 nets) and one fully connected softmax layer.
For each activation a few learning rates are tried (SGD, momentum 0.9, batch 64, no dropout, no
weight decay) and the one that reaches 25% training error first is plotted. The training error is
measured on the whole training set, with the current parameters, a few times per epoch.
Default budget (4 epochs, 4 learning rates, 2 activations): 30-40 s per run, about five minutes
on a 2-core CPU; the figure of docs/reproducing.md (2 epochs, 3 rates, 11 measurements per epoch) about two.
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import numpy as np
import optax

from alexnet_jax import cli
from alexnet_jax import paths
from alexnet_jax.core import metrics
from alexnet_jax.core import ops
from alexnet_jax.data import augment
from alexnet_jax.data import pipeline as input_pipeline
from alexnet_jax.data import stats as data_stats
from alexnet_jax.errors import UserError

TARGET_ERROR = 0.25  # §3.1 / Figure 1: epochs to reach 25% training error.
ACTIVATIONS = {'relu': nn.relu, 'tanh': jnp.tanh}
DEFAULT_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1)


class FourLayerNet(nn.Module):
  """Three conv layers (5x5, each followed by the activation and 3x3/2 max-pooling) + softmax."""
  activation: str = 'relu'
  features: Sequence[int] = (32, 32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    # Pixels minus the mean are up to +-255: scaled to about +-1, so that tanh units do not start
    # saturated and the comparison is of the activations, not of an input scale that suits one.
    x = x / augment.PIXEL_MAX
    for f in self.features:
      x = ops.max_pool(act(nn.Conv(f, (5, 5), padding='SAME')(x)), 3, 2)
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def data_config(base, batch_size: int = 64, seed: int = 0):
  """The data of `base` (configs/digits.py), un-augmented: central patches, as evaluation sees
  them."""
  c = base.copy_and_resolve_references()
  c.random_crop = False
  c.batch_size = batch_size
  c.seed = seed
  return c


def train_curve(activation: str, learning_rate: float, epochs: float, *, config, mean,
                train_set: list[dict[str, np.ndarray]], evals_per_epoch: int = 4,
                seed: int = 0) -> dict[str, Any]:
  """Trains one net; returns {'epochs': [...], 'train_error': [...], 'epochs_to_target'}.

  `train_set` holds the evaluation batches of the whole training split (with masks); the error
  over it is recorded `evals_per_epoch` times per epoch and at epoch 0. 'epochs_to_target' is
  the first recorded epoch at which the error is at most TARGET_ERROR (None: not reached).
  """
  info = input_pipeline.get_dataset_info(config)
  per_epoch = input_pipeline.steps_per_epoch(config, info)
  total = int(round(epochs * per_epoch))
  every = max(1, per_epoch // evals_per_epoch)
  model = FourLayerNet(activation)
  params = model.init(jax.random.key(seed), jnp.zeros((1, config.image_size,
                                                        config.image_size, 3)))['params']
  tx = optax.sgd(learning_rate, momentum=0.9)  # §3.1: no weight decay, no dropout
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    grads = jax.grad(lambda p: jnp.mean(metrics.cross_entropy(
        model.apply({'params': p}, images), labels)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def errors(params, images, labels, mask):
    wrong = metrics.topk_errors(model.apply({'params': params}, images), labels, 1)
    return jnp.sum(wrong * mask), jnp.sum(mask)

  def train_error(params):
    sums = [errors(params, b['image'], b['label'], b['mask']) for b in train_set]
    err = float(sum(s[0] for s in sums) / sum(s[1] for s in sums))
    return err if np.isfinite(err) else 1.0

  curve_epochs, curve = [0.0], [train_error(params)]
  it = input_pipeline.train_iterator(config, mean=mean)
  try:
    for t in range(1, total + 1):
      batch = next(it)
      params, opt_state = step(params, opt_state, batch['image'], batch['label'])
      if t % every == 0 or t == total:
        curve_epochs.append(t / per_epoch)
        curve.append(train_error(params))
  finally:
    it.close()
  reached = [e for e, err in zip(curve_epochs, curve) if err <= TARGET_ERROR]
  return {'activation': activation, 'learning_rate': learning_rate, 'epochs': curve_epochs,
          'train_error': curve, 'epochs_to_target': reached[0] if reached else None}


def _speed_key(run: dict[str, Any]) -> tuple[float, float]:
  """Sorts runs fastest first: by epochs to 25%, then by the final training error."""
  reached = run['epochs_to_target']
  return (reached if reached is not None else float('inf'), run['train_error'][-1])


def compare(base, epochs: float = 4,
            learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES, *,
            evals_per_epoch: int = 4, seed: int = 0) -> dict[str, Any]:
  """Sweeps the learning rates for ReLU and tanh on `base`'s data (configs/digits.py); returns
  the fastest run of each and all runs."""
  config = data_config(base, seed=seed)
  mean = data_stats.mean_to_subtract(config, data_stats.compute_stats(config, 0))
  train_set = list(input_pipeline.eval_iterator(config, split=config.train_split, mean=mean))
  runs, start = [], time.time()
  for activation in ACTIVATIONS:
    for lr in learning_rates:
      run = train_curve(activation, lr, epochs, config=config, mean=mean, train_set=train_set,
                        evals_per_epoch=evals_per_epoch, seed=seed)
      runs.append(run)
      logging.info('%s lr %g: %s; final training error %.2f%% (%.0f s so far)', activation, lr,
                   _reached_text(run['epochs_to_target']), 100 * run['train_error'][-1],
                   time.time() - start)
  best = {a: min((r for r in runs if r['activation'] == a), key=_speed_key) for a in ACTIVATIONS}
  relu, tanh = best['relu']['epochs_to_target'], best['tanh']['epochs_to_target']
  return {'best': best, 'runs': runs, 'dataset': 'digits (sklearn), not CIFAR-10',
          'speedup': tanh / relu if relu and tanh else None}


def _reached_text(epochs: float | None) -> str:
  return f'25% reached at epoch {epochs:.2f}' if epochs is not None else '25% not reached'


def _speed_text(speedup: float | None) -> str:
  """'ReLU 6.0x faster' or, when tanh won, 'tanh 2.0x faster' ('' if either never reached 25%)."""
  if not speedup:
    return ''
  return f'ReLU {speedup:.1f}x faster' if speedup >= 1 else f'tanh {1 / speedup:.1f}x faster'


def plot(result: dict[str, Any], output: str) -> None:
  """Figure 1: training error against epochs, ReLU solid, tanh dashed, the 25% line dotted."""
  fig = Figure(figsize=(5.5, 4), dpi=100)
  ax = fig.subplots()
  for activation, style in (('relu', '-'), ('tanh', '--')):
    run = result['best'][activation]
    label = (f'{"ReLU" if activation == "relu" else "tanh"} (lr {run["learning_rate"]:g}): '
             f'{_reached_text(run["epochs_to_target"])}')
    ax.plot(run['epochs'], run['train_error'], style, color='black', label=label)
  ax.axhline(TARGET_ERROR, linestyle=':', color='grey')
  ax.set_xlabel('Epochs')
  ax.set_ylabel('Training error rate')
  ax.set_ylim(0, 1)
  speed = _speed_text(result['speedup'])
  ax.set_title('Four-layer convnet on digits (Figure 1 was CIFAR-10)' +
               (f'\n{speed} to 25% training error' if speed else ''), fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(output)


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', cli.checkout_config('digits.py'),
                                  'Whose data to train on (configs/digits.py).')
  flags.DEFINE_string('output', 'fig1.png', 'PNG file for the figure.')
  flags.DEFINE_string('json', None, 'Optional JSON file for all curves.')
  flags.DEFINE_float('epochs', 4, 'Training epochs per run.')
  flags.DEFINE_list('learning_rates', [str(x) for x in DEFAULT_LEARNING_RATES],
                    'Learning rates tried for each activation.')
  flags.DEFINE_integer('evals_per_epoch', 4, 'Training-error measurements per epoch.')
  flags.DEFINE_integer('seed', 0, 'Initialisation and data-order seed (the same for all runs).')


def main(argv: Sequence[str]) -> None:
  """Runs the sweep, writes the figure, prints epochs to 25% for each activation."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.config is None:
    raise UserError('No configs/digits.py next to this installation: pass --config=FILE.')
  try:
    rates = [float(x) for x in f.learning_rates]
  except ValueError:
    raise UserError(f'--learning_rates={",".join(f.learning_rates)}: give numbers, e.g. '
                    '0.01,0.1') from None
  if f.epochs <= 0 or f.evals_per_epoch < 1 or not rates or min(rates) <= 0:
    raise UserError(f'--epochs={f.epochs}, --evals_per_epoch={f.evals_per_epoch} and '
                    f'--learning_rates={f.learning_rates} must all be positive.')
  cli.prepare_output(f.output)
  if f.json:
    cli.prepare_output(f.json, flag='json')
  result = compare(f.config, f.epochs, rates, evals_per_epoch=f.evals_per_epoch, seed=f.seed)
  plot(result, f.output)
  for activation, run in result['best'].items():
    print(f'{activation}: lr {run["learning_rate"]:g}, {_reached_text(run["epochs_to_target"])}'
          f', final training error {100 * run["train_error"][-1]:.2f}%')
  if result['speedup']:
    print(f'{_speed_text(result["speedup"])} to 25% training error (the paper: ReLU about 6x '
          'faster on CIFAR-10).')
  if f.json:
    paths.write_json(f.json, result, indent=1)
  print(f'Wrote {f.output}')


if __name__ == '__main__':
  cli.run(main, _define_flags)
