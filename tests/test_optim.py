"""The optimiser against a NumPy implementation of §5's update rule, and the two schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax.core import optim

import conftest


def _config(**overrides):
  return conftest.config('alexnet', **overrides)


def _toy_problem():
  """Least squares: L(w, b) = mean((X w + b - y)^2) / 2, with its gradient in closed form.

  The weights are named 'kernel' and the bias 'bias', as in the model's parameters."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5))
  y = rng.normal(size=(32,))
  params = {'kernel': rng.normal(size=(5,)), 'bias': np.array(0.5)}

  def grad(p):
    r = x @ p['kernel'] + p['bias'] - y
    return {'kernel': x.T @ r / len(y), 'bias': np.array(r.mean())}

  return params, grad


@pytest.mark.parametrize('decay_biases', [False, True])
@pytest.mark.parametrize('lrs', [[0.01] * 6, [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001]])
def test_optimizer_follows_the_papers_update_rule(lrs, decay_biases):
  params, grad = _toy_problem()
  tx = optim.create_optimizer(_config(decay_biases=decay_biases))
  jparams = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(jparams)
  # §5: v <- 0.9 v - 0.0005 e w - e g ; w <- w + v  (NumPy, float64), for the weights w; the
  # bias gets no decay term unless decay_biases (the ablation).
  decay = {'kernel': 0.0005, 'bias': 0.0005 if decay_biases else 0.0}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  w = {k: p.copy() for k, p in params.items()}
  for lr in lrs:
    g = grad(w)
    v = {k: 0.9 * v[k] - decay[k] * lr * w[k] - lr * g[k] for k in w}
    w = {k: w[k] + v[k] for k in w}
    jgrad = jax.tree_util.tree_map(jnp.asarray, grad(jax.tree_util.tree_map(np.asarray,
                                                                            jparams)))
    state = optim.with_learning_rate(state, lr)
    updates, state = tx.update(jgrad, state, jparams)
    jparams = optax.apply_updates(jparams, updates)
  for k in w:
    np.testing.assert_allclose(np.asarray(jparams[k]), w[k], rtol=1e-5, atol=1e-6)


def test_constant_rate_equals_optax_sgd_with_decayed_weights():
  params, grad = _toy_problem()
  params = jax.tree_util.tree_map(jnp.asarray, params)
  ours = optim.create_optimizer(_config())
  ref = optax.chain(optax.add_decayed_weights(5e-4, mask={'kernel': True, 'bias': False}),
                    optax.sgd(0.01, momentum=0.9))
  p1, p2, s1, s2 = params, params, ours.init(params), ref.init(params)
  for _ in range(5):
    u1, s1 = ours.update(jax.tree_util.tree_map(jnp.asarray, grad(p1)), s1, p1)
    u2, s2 = ref.update(jax.tree_util.tree_map(jnp.asarray, grad(p2)), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), p1, p2)


def test_step_schedule_divides_by_ten_at_the_configured_epochs():
  lr = optim.LearningRate(_config(lr_schedule='step', lr_decay_epochs=(2, 4)), steps_per_epoch=10)
  assert lr.value(0) == pytest.approx(0.01)
  assert lr.value(19) == pytest.approx(0.01)
  assert lr.value(20) == pytest.approx(0.001)
  assert lr.value(39) == pytest.approx(0.001)
  assert lr.value(40) == pytest.approx(0.0001)
  lr.observe(0.5)  # Validation errors do not move a step schedule.
  assert lr.value(0) == pytest.approx(0.01)
  # The same values as optax's piecewise-constant schedule at every step.
  reference = optax.piecewise_constant_schedule(0.01, {20: 0.1, 40: 0.1})
  for step in range(60):
    assert lr.value(step) == pytest.approx(float(reference(step)), rel=1e-6), step


def test_plateau_schedule_divides_when_validation_error_stops_improving_three_times_at_most():
  lr = optim.LearningRate(_config(lr_schedule='plateau', plateau_patience=2), steps_per_epoch=10)
  assert lr.value(123) == pytest.approx(0.01)
  seen = []
  for err in [0.9, 0.8, 0.7, 0.7, 0.7, 0.65, 0.66, 0.66, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:
    lr.observe(err)
    seen.append(lr.value(0))
  # Patience 2: two evaluations without improvement divide the rate by 10.
  assert seen[:4] == pytest.approx([0.01] * 4)
  assert seen[4] == pytest.approx(0.001)  # 0.7 twice after the best 0.7
  assert seen[7] == pytest.approx(0.0001)  # 0.66, 0.66 after 0.65
  assert seen[10] == pytest.approx(0.00001)  # 0.6, 0.6 after 0.6
  # §5: three reductions, no more.
  assert seen[-1] == pytest.approx(0.00001)
  assert lr.num_decays == 3


def test_schedule_state_round_trips():
  config = _config(lr_schedule='plateau', plateau_patience=1)
  a = optim.LearningRate(config, 10)
  for err in [0.5, 0.6]:
    a.observe(err)
  b = optim.LearningRate(config, 10)
  b.restore(jax.tree_util.tree_map(np.asarray, a.state()))
  assert b.value(0) == pytest.approx(a.value(0)) == pytest.approx(0.001)
  b.observe(0.5)
  a.observe(0.5)
  assert b.value(0) == pytest.approx(a.value(0))


def test_biases_keep_their_value_without_gradient():
  """§5's bias of 1 stays 1 when its gradient is zero: no decay pulls it towards 0."""
  params = {'fc6': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}}
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  for decay_biases, expected_bias in ((False, 1.0), (True, (1 - 0.01 * 5e-4))):
    tx = optim.create_optimizer(_config(decay_biases=decay_biases))
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new['fc6']['bias'], expected_bias, rtol=1e-7)
    np.testing.assert_allclose(new['fc6']['kernel'], 1 - 0.01 * 5e-4, rtol=1e-7)


@pytest.mark.parametrize('decay_biases', [False, True])
def test_lars_follows_you_et_al_layerwise_rule(decay_biases):
  """You et al. 2017, written out in NumPy: each weight tensor's step is scaled by its trust
  ratio eta * ||w|| / ||g + wd w||; the bias takes the plain step (decayed only if asked)."""
  params, grad = _toy_problem()
  params['kernel'] = params['kernel'] * 0.1  # ||w|| and ||g|| of different sizes
  config = _config(optimizer='lars', lars_trust_coefficient=0.02, decay_biases=decay_biases)
  tx = optim.create_optimizer(config)
  jparams = jax.tree_util.tree_map(jnp.asarray, params)
  state = tx.init(jparams)
  w, v = dict(params), {k: np.zeros_like(x) for k, x in params.items()}
  lrs = [0.5, 0.5, 0.05]
  for lr in lrs:
    g = grad(w)
    for name in w:
      step = g[name] + (config.weight_decay * w[name]
                        if name == 'kernel' or decay_biases else 0.0)
      if name == 'kernel':
        step = step * (config.lars_trust_coefficient * np.linalg.norm(w[name])
                       / np.linalg.norm(step))
      v[name] = config.momentum * v[name] - lr * step
      w[name] = w[name] + v[name]
    updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, grad(
        jax.tree_util.tree_map(np.asarray, jparams))), optim.with_learning_rate(state, lr),
        jparams)
    jparams = optax.apply_updates(jparams, updates)
  for name in w:
    np.testing.assert_allclose(np.asarray(jparams[name]), w[name], rtol=2e-5, atol=1e-7)
  # The trust ratio did something: plain SGD from the same start ends elsewhere.
  assert not np.allclose(np.asarray(jparams['kernel']),
                         _sgd_reference(params, grad, lrs, config), rtol=1e-3)


def _sgd_reference(params, grad, lrs, config):
  w, v = params['kernel'].copy(), np.zeros_like(params['kernel'])
  p = dict(params)
  for lr in lrs:
    p['kernel'] = w
    v = config.momentum * v - lr * (grad(p)['kernel'] + config.weight_decay * w)
    w = w + v
  return w


@pytest.mark.parametrize('init', [None, 0.0])
def test_linear_scaling_and_warmup_follow_goyal_et_al(init):
  """Goyal et al. 2017: batch k x 128 -> learning rate k x 0.01, reached linearly over the
  warm-up from the unscaled rate (or `warmup_init_lr`), then the step schedule as usual."""
  config = _config(batch_size=1024, lr_reference_batch=128, warmup_epochs=2.0,
                   warmup_init_lr=init, lr_schedule='step', lr_decay_epochs=(3,))
  lr = optim.LearningRate(config, steps_per_epoch=10)
  peak, start = 0.01 * 8, (0.01 if init is None else init)
  expected = [start + (peak - start) * s / 20 for s in range(20)] + [peak] * 10 + [peak / 10] * 5
  np.testing.assert_allclose([lr.value(s) for s in range(35)], expected, rtol=1e-12)
  assert optim.LearningRate(_config(), 10).value(0) == 0.01  # off by default: §5's rate


@pytest.mark.parametrize('optimizer', ['sgd', 'lars'])
def test_frozen_layers_get_no_update_and_the_others_the_unfrozen_one(optimizer):
  """config.freeze_through: layers up to it never move; every other layer moves exactly as
  without freezing (their updates do not depend on the frozen layers' gradients)."""
  rng = np.random.default_rng(1)
  shapes = {'kernel': (3, 4), 'bias': (4,)}
  params = {layer: {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
            for layer in optim.LAYERS}
  grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                                  params) for _ in range(3)]
  assert optim.frozen_layers('fc6') == ('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6')

  def run(freeze_through):
    tx = optim.create_optimizer(_config(optimizer=optimizer, freeze_through=freeze_through))
    p, state = params, tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p

  frozen, free = run('fc6'), run('none')
  for layer in optim.LAYERS:
    for k in shapes:
      if layer in optim.frozen_layers('fc6'):
        np.testing.assert_array_equal(frozen[layer][k], params[layer][k])
      else:
        assert not np.array_equal(free[layer][k], params[layer][k])
        np.testing.assert_array_equal(frozen[layer][k], free[layer][k])
