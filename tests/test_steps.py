"""The training and evaluation steps (data-parallel, under pmap) against one-device and NumPy
computations."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from alexnet_jax.core import models
from alexnet_jax.core import optim
from alexnet_jax.core import parallel
from alexnet_jax.core import steps

import conftest


def _small_config(**overrides):
  return conftest.config('digits', **overrides)


def _batches(n, batch_size, size=28, classes=10):
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(0, 60, (batch_size, size, size, 3)).astype(np.float32),
           'label': rng.integers(0, classes, batch_size).astype(np.int32)} for _ in range(n)]


def _train(config, batches, num_devices):
  devices = jax.local_devices()[:num_devices]
  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  state = steps.create_train_state(model, tx, seed=0, image_size=config.image_size)
  rstate = parallel.replicate(state, devices)
  p_train = parallel.pmapped_train_step(model, tx, devices)
  history = []
  for batch in batches:
    rstate, m, _ = p_train(rstate, parallel.shard(batch, num_devices), np.float32(0.01),
                           np.zeros(num_devices, np.int32))
    history.append(parallel.unreplicate(m))
  return parallel.unreplicate(rstate), history


def test_one_and_four_devices_give_the_same_parameters_without_dropout():
  assert jax.local_device_count() >= 4, 'tests/conftest.py simulates 8 CPU devices'
  config = _small_config(dropout_rate=0.0)
  batches = _batches(3, 16)
  one, h1 = _train(config, batches, 1)
  four, h4 = _train(config, batches, 4)
  assert int(one.step) == int(four.step) == 3
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), one.params,
      four.params)
  # The momentum buffers agree too, and so do the averaged metrics.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                         one.opt_state, four.opt_state)
  for a, b in zip(h1, h4):
    assert a['train/loss'] == pytest.approx(b['train/loss'], rel=1e-5)
  # And training did move the parameters.
  init = steps.create_train_state(models.create_model(config), optim.create_optimizer(config), 0,
                                  28)
  assert not np.allclose(one.params['fc8']['kernel'], init.params['fc8']['kernel'])


def test_each_device_draws_its_own_dropout_masks():
  config = _small_config(dropout_rate=0.5)
  half = _batches(1, 8)[0]
  doubled = {k: np.concatenate([v, v]) for k, v in half.items()}
  one, _ = _train(config, [half], 1)
  two, _ = _train(config, [doubled], 2)
  # Device 0 of the two-device run uses the same key as the one-device run; if device 1 reused
  # it, the averaged gradient would equal the one-device gradient exactly.
  # (Without dropout they would agree: see the one-versus-four-devices test.)
  assert not np.allclose(one.params['fc6']['kernel'], two.params['fc6']['kernel'])


class _LogitsAreInputs(nn.Module):
  """A stand-in model whose logits are its input, so the evaluation arithmetic can be checked."""

  @nn.compact
  def __call__(self, x, train=False):
    return x.reshape(x.shape[0], -1)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('ten_crop', [False, True])
def test_eval_step_counts_only_masked_examples_and_averages_ten_crops(ten_crop):
  rng = np.random.default_rng(1)
  b, classes = 8, 7
  # Shaped like images ([B, 10, H, W, C] for ten crops) with H = W = 1 and C = classes.
  shape = (b, 10, 1, 1, classes) if ten_crop else (b, 1, 1, classes)
  images = rng.normal(0, 2, shape).astype(np.float32)
  images[2] = 1.0  # every class tied: an error for top-1 and top-5 alike
  images[5] = np.round(images[5])  # some classes tied
  logits = images.reshape(b, 10, classes) if ten_crop else images.reshape(b, classes)
  labels = rng.integers(0, classes, b).astype(np.int32)
  mask = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)
  p_eval = parallel.pmapped_eval_step(_LogitsAreInputs(), jax.local_devices()[:2])
  out = p_eval({}, parallel.shard({'image': images, 'label': labels, 'mask': mask}, 2))
  out = {k: float(np.asarray(v)[0]) for k, v in out.items()}
  probs = _softmax(logits.astype(np.float64))
  if ten_crop:
    probs = probs.mean(axis=1)
  # Wrong unless fewer than k other classes are at least as probable as the true one.
  others = np.array([(np.delete(probs[i], labels[i]) >= probs[i, labels[i]]).sum()
                     for i in range(b)])
  top1, top5 = others >= 1, others >= 5
  assert top1[2] and top5[2]
  assert out['count'] == mask.sum()
  assert out['top1_errors'] == (top1 & mask).sum()
  assert out['top5_errors'] == (top5 & mask).sum()
  nll = -np.log(probs[np.arange(b), labels])
  assert out['loss'] == pytest.approx((nll * mask).sum(), rel=1e-5)


@pytest.mark.parametrize('ahead', [0, 2])
def test_device_batches_are_the_host_batches_placed_ahead_of_use(ahead):
  devices = jax.local_devices()[:4]
  host = _batches(5, 8, size=4)
  pulled = []

  def source():
    for batch in host:
      pulled.append(1)
      yield batch

  out = []
  put = lambda b: jax.device_put(parallel.shard(b, 4), parallel.device_axis_sharding(devices))
  for k, batch in enumerate(parallel.device_batches(source(), ahead, put)):
    # When batch k is handed over, the next `ahead` are already on their way to the devices.
    assert len(pulled) == min(k + 1 + ahead, len(host))
    assert [s.device for s in batch['image'].addressable_shards] == devices
    out.append(batch)
  assert len(out) == len(host)
  for placed, batch in zip(out, host):
    for key in batch:
      np.testing.assert_array_equal(np.asarray(placed[key]), parallel.shard(batch, 4)[key])
