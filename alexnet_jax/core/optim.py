"""The paper's optimiser (§5) and its learning-rate schedules.

§5's update rule, with e the learning rate:
    v <- 0.9 v - 0.0005 e w - e dL/dw
    w <- w + v
`paper_sgd` builds exactly this from optax pieces: decayed weights are added to the gradient,
the sum is scaled by -e, and the momentum trace accumulates the scaled step. Unlike
`optax.sgd(momentum=...)`, which scales the trace by the current e, the velocity here keeps the
learning rates it was built with, as in the paper's rule, so the two differ only while e changes.
"""

from __future__ import annotations

import bisect
from typing import Any

import jax
import jax.numpy as jnp
import optax


def weights_only(params: Any) -> Any:
  """True for every kernel, False for every bias: what §5's weight decay applies to."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) != 'bias', params)


# The layers of every variant, input to output (models.AlexNet's parameter names).
LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8')


def frozen_layers(freeze_through: str) -> tuple[str, ...]:
  """The layers config.freeze_through freezes: every layer up to and including it."""
  if freeze_through == 'none':
    return ()
  if freeze_through not in LAYERS:
    raise ValueError(f'freeze_through={freeze_through!r}: choose none or one of {LAYERS}')
  return LAYERS[:LAYERS.index(freeze_through) + 1]


def trainable_only(tx: optax.GradientTransformation,
                   frozen: tuple[str, ...]) -> optax.GradientTransformation:
  """`tx` for every layer but those in `frozen`, which get a zero update: no gradient step, no
  momentum (no state is kept for them) and no weight decay. optax's masking
  (`optax.multi_transform`), by the top-level layer name of each parameter."""
  if not frozen:
    return tx
  def labels(params):
    label = lambda layer: 'frozen' if layer in frozen else 'train'
    return {layer: jax.tree_util.tree_map(lambda _: label(layer), arrays)
            for layer, arrays in params.items()}
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def paper_sgd(learning_rate: float, momentum: float, weight_decay: float,
              decay_biases: bool = False, frozen: tuple[str, ...] = ()
              ) -> optax.GradientTransformation:
  """§5: SGD with momentum and weight decay, v <- m v - wd e w - e g; w <- w + v.

  The decay term applies to the weights only (§5 writes it for w; cuda-convnet and Caffe's
  reference AlexNet leave biases undecayed) unless `decay_biases`. Layers in `frozen` are not
  updated (`trainable_only`).
  """
  return trainable_only(optax.chain(
      optax.add_decayed_weights(weight_decay, mask=None if decay_biases else weights_only),
      optax.scale_by_learning_rate(learning_rate),
      optax.trace(decay=momentum),
  ), frozen)


def lars(learning_rate: float, momentum: float, weight_decay: float, trust_coefficient: float,
         decay_biases: bool = False, frozen: tuple[str, ...] = ()
         ) -> optax.GradientTransformation:
  """LARS (You et al. 2017), optax's: `paper_sgd` with each weight tensor's step (gradient plus
  decay) scaled by trust_coefficient * ||w|| / ||g + wd w|| (1 where either norm is 0).

  Biases take the plain step, as in You et al.'s and MLPerf's implementations (a bias's norm
  says nothing about its scale); they are decayed only with `decay_biases`.
  """
  return trainable_only(optax.lars(
      learning_rate, weight_decay, weight_decay_mask=True if decay_biases else weights_only,
      trust_coefficient=trust_coefficient, trust_ratio_mask=weights_only, momentum=momentum),
      frozen)


def create_optimizer(config: Any) -> optax.GradientTransformation:
  """`paper_sgd` (or `lars`) with the learning rate held in the optimizer state, set each step.

  The learning rate is a hyper-parameter of the state (optax.inject_hyperparams) so the training
  step can be given the value of whichever schedule runs, including the validation-driven
  plateau schedule that no function of the step count can express.
  """
  static = ('decay_biases', 'frozen')
  frozen = frozen_layers(config.freeze_through)
  if config.optimizer == 'lars':
    return optax.inject_hyperparams(lars, static_args=static)(
        learning_rate=config.learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay, trust_coefficient=config.lars_trust_coefficient,
        decay_biases=config.decay_biases, frozen=frozen)
  return optax.inject_hyperparams(paper_sgd, static_args=static)(
      learning_rate=config.learning_rate, momentum=config.momentum,
      weight_decay=config.weight_decay, decay_biases=config.decay_biases, frozen=frozen)


def peak_learning_rate(config: Any) -> float:
  """config.learning_rate, times batch_size / lr_reference_batch when that is set: Goyal et
  al. 2017's linear scaling rule (k times the batch, k times the learning rate)."""
  if config.lr_reference_batch > 0:
    return config.learning_rate * config.batch_size / config.lr_reference_batch
  return config.learning_rate


def with_learning_rate(opt_state: Any, learning_rate: jnp.ndarray) -> Any:
  """Returns `opt_state` (of `create_optimizer`) with its learning rate replaced."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(learning_rate,
                                             hyperparams['learning_rate'].dtype)
  return opt_state._replace(hyperparams=hyperparams)


def plateau_transform(config: Any) -> optax.GradientTransformation:
  """§5: divide by 10 when the validation error stops improving, at most three times.

  optax.contrib.reduce_on_plateau is driven here once per evaluation with the validation top-1
  error; its `scale` (1, 0.1, 0.01, 0.001 and no lower) multiplies the base learning rate.
  """
  return optax.contrib.reduce_on_plateau(
      factor=config.lr_decay_factor, patience=config.plateau_patience, rtol=0.0, atol=1e-6,
      min_scale=config.lr_decay_factor ** config.plateau_max_decays)


class LearningRate:
  """The host-side learning-rate schedule: `value(step)`; `observe(error)` after evaluations.

  Its state (`state` / `restore`) is part of every checkpoint, so a resumed run continues with
  the same plateau count and best error.
  """

  def __init__(self, config: Any, steps_per_epoch: int):
    self.kind = config.lr_schedule
    self.base = peak_learning_rate(config)
    # Goyal et al. 2017's gradual warm-up, linear from `warmup_init` to the (scaled) base over
    # the first `warmup_steps`; the schedule's own factor multiplies it as after warm-up.
    self.warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    self.warmup_init = (config.learning_rate if config.warmup_init_lr is None
                        else config.warmup_init_lr)
    self.factor = config.lr_decay_factor
    # 'step': divide by 1/lr_decay_factor at each of lr_decay_epochs. Evaluated on the host
    # every step as a bisect; optax.piecewise_constant_schedule (the same values, tested) would
    # run jnp ops whose float() waits for the device queue each step.
    self._bounds = sorted(int(e * steps_per_epoch) for e in config.lr_decay_epochs)
    self._plateau = plateau_transform(config)
    self.plateau_state = self._plateau.init(jnp.zeros(()))

  def value(self, step: int) -> float:
    if self.kind == 'step':
      factor = self.factor ** bisect.bisect_right(self._bounds, step)
    else:
      factor = float(self.plateau_state.scale)
    if step < self.warmup_steps:
      return factor * (self.warmup_init + (self.base - self.warmup_init) * step
                       / self.warmup_steps)
    return self.base * factor

  def observe(self, val_error: float) -> None:
    """Feeds one validation error to the plateau schedule (no effect for 'step')."""
    if self.kind == 'plateau':
      _, self.plateau_state = self._plateau.update(
          jnp.zeros(()), self.plateau_state, value=jnp.asarray(val_error, jnp.float32))

  @property
  def num_decays(self) -> int:
    return int(round(float(jnp.log(self.plateau_state.scale) / jnp.log(self.factor))))

  def state(self) -> Any:
    return self.plateau_state

  def restore(self, state: Any) -> None:
    self.plateau_state = type(self.plateau_state)(*state)
