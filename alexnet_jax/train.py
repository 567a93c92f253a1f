"""The training loop: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

Side effects live here (files, logging, signals, devices); the steps themselves are pure
functions in `steps.py`. A run is resumable at any step: rerunning the same command on the same
workdir continues from the latest checkpoint with the same parameters, momentum, learning-rate
schedule, RNG and position in the data, so it sees the batches an uninterrupted run would see.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import checkpoints
from alexnet_jax import input_pipeline
from alexnet_jax import metrics as metrics_lib
from alexnet_jax import models
from alexnet_jax import optim
from alexnet_jax import steps

BUILTIN_SOURCES = ('digits', 'folder', 'synthetic')


def console_logging() -> None:
  """The commands' console: INFO progress lines, without Orbax's INFO chatter (dozens of lines
  per checkpoint)."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)

  class _Filter(std_logging.Filter):

    def filter(self, record):
      return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname

  logging.get_absl_logger().addFilter(_Filter())


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Stops before any work on values that cannot run, naming the field and the value."""

  def fail(field, why):
    raise ValueError(f'config.{field}={config.get(field)!r}: {why}')

  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    value = config.get(field)
    if not isinstance(value, int) or value <= 0:
      fail(field, 'must be a positive integer')
    if value % devices:
      fail(field, f'must divide evenly over the {devices} devices '
                  f'(try a multiple of {devices})')
  for field in ('num_epochs', 'num_classes', 'image_size', 'resize_size', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    if not isinstance(config.get(field), (int, float)) or config.get(field) <= 0:
      fail(field, 'must be positive')
  if config.image_size > config.resize_size:
    fail('image_size', f'crops cannot be larger than the resized image ({config.resize_size})')
  if not config.learning_rate > 0:
    fail('learning_rate', 'must be positive')
  if not 0 <= config.momentum < 1:
    fail('momentum', 'must be in [0, 1)')
  if config.weight_decay < 0:
    fail('weight_decay', 'must be non-negative')
  if config.lr_schedule not in optim.LR_SCHEDULES:
    fail('lr_schedule', f'choose one of {optim.LR_SCHEDULES}')
  if config.mean not in ('image', 'channel', 'none'):
    fail('mean', "choose 'image' (the paper's mean image), 'channel' or 'none'")
  if config.pca_lighting_scale not in ('paper', 'cuda_convnet'):
    fail('pca_lighting_scale', "choose 'paper' or 'cuda_convnet'")
  if config.dataset not in BUILTIN_SOURCES:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if config.dataset not in tfds.list_builders():
      fail('dataset', f'is neither a TFDS dataset nor one of {BUILTIN_SOURCES}')
  if config.dataset == 'folder' and not config.data_dir:
    fail('data_dir', "dataset 'folder' needs --config.data_dir=ROOT (ROOT/<split>/<class>/*.jpg)")
  models.create_model(config)  # Validates the model fields (variant, dtype, ...).


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))


class _StopRequest:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the loop checks between steps."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave the handlers alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # A second Ctrl-C: give up at once.
      raise KeyboardInterrupt
    self.signal = signum
    logging.warning('Received %s: saving a checkpoint and stopping after this step.',
                    signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def run_evaluation(p_eval, params, config: ml_collections.ConfigDict, *, ten_crop: bool,
                   workdir: str | None) -> dict[str, float]:
  """Top-1/top-5 error and loss over the whole eval split (padded batches are masked out)."""
  info = input_pipeline.get_dataset_info(config)
  total = input_pipeline.num_eval_batches(config, info)
  if config.num_eval_steps > 0:
    total = min(total, config.num_eval_steps)
  sums = None
  start = time.time()
  it = input_pipeline.eval_iterator(config, ten_crop=ten_crop, workdir=workdir)
  try:
    for i, batch in enumerate(it):
      if i >= total:
        break
      out = p_eval(params, steps.shard(batch))
      sums = out if sums is None else jax.tree_util.tree_map(lambda a, b: a + b, sums, out)
      if (i + 1) % max(1, total // 10) == 0 or i + 1 == total:
        logging.info('  eval batch %d/%d (%.1f s)', i + 1, total, time.time() - start)
  finally:
    it.close()
  sums = {k: float(np.asarray(v.addressable_shards[0].data)[0]) for k, v in sums.items()}
  count = max(sums['count'], 1.0)
  return {'eval/loss': sums['loss'] / count, 'eval/top1_error': sums['top1_errors'] / count,
          'eval/top5_error': sums['top5_errors'] / count, 'eval/num_examples': sums['count']}


class _PendingMetrics:
  """Per-step metrics kept on the device until a log or a save fetches them (no sync per step)."""

  def __init__(self):
    self.items: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked
    self.checked: list[tuple[int, dict[str, float]]] = []  # host values not yet logged

  def add(self, step: int, m: Any) -> None:
    self.items.append((step, m))

  def check(self) -> None:
    """Moves pending metrics to the host; raises TrainingDivergedError on a NaN or inf loss."""
    for step, m in self.items:
      host = {k: float(np.asarray(v.addressable_shards[0].data)[0]) for k, v in m.items()}
      if not math.isfinite(host['train/loss']):
        raise TrainingDivergedError(
            f'The training loss became {host["train/loss"]} at step {step}. Stopping; the last '
            'good checkpoint is kept. Try a lower --config.learning_rate, '
            '--config.bias_init_one=0.1 (Caffe), or float32 instead of bfloat16.')
      self.checked.append((step, host))
    self.items = []

  def take(self) -> list[tuple[int, dict[str, float]]]:
    """All metrics since the last `take` (checked), for logging."""
    self.check()
    out, self.checked = self.checked, []
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config`'s network, evaluating and checkpointing into `workdir`; resumes if possible.

  Returns the last evaluation's metrics.
  """
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  info = input_pipeline.get_dataset_info(config)  # Checks the classes fit num_classes.
  steps_per_epoch = input_pipeline.steps_per_epoch(config, info)  # Checks one batch fits.
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else max(1, int(config.eval_every_epochs * steps_per_epoch)))
  if is_main:
    _save_config(config, workdir)
  logging.info('%s: %d training / %d eval examples, %d classes; %d steps of %d (%d per epoch) '
               'on %d devices', config.dataset, info.num_train, info.num_eval, info.num_classes,
               total_steps, config.batch_size, steps_per_epoch, jax.device_count())

  model = models.create_model(config)
  tx = optim.create_optimizer(config)
  lr = optim.LearningRate(config, steps_per_epoch)
  state = steps.create_train_state(model, tx, config.seed, config.image_size)
  state = jax.tree_util.tree_map(np.asarray, state)
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints)
  meta = {'best_top1_error': None, 'best_step': None}
  restored = checkpoints.restore(manager, state, lr.state())
  if restored is not None:
    state, schedule, meta = restored
    lr.restore(schedule)
    logging.info('Resuming from the checkpoint of step %d in %s', int(state.step),
                 manager.directory)
  start_step = int(state.step)
  logging.info('Parameters: %s', f'{models.count_params(state.params):,}')

  p_train = steps.pmapped_train_step(model, tx)
  p_eval = steps.pmapped_eval_step(model)
  rstate = steps.replicate(state)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  pending = _PendingMetrics()
  last_eval: dict[str, float] = {}

  def save(step, eval_metrics=None):
    pending.check()  # Never checkpoint a diverged state: neither its loss...
    host = steps.unreplicate(rstate)
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host.params)):
      # ...nor its parameters (the last step's update can overflow while its loss, computed
      # before the update, is still finite).
      raise TrainingDivergedError(
          f'The parameters became NaN or infinite at step {step}. Stopping; the last good '
          'checkpoint is kept. Try a lower --config.learning_rate.')
    checkpoints.save(manager, step, host, lr.state(), dict(meta, epoch=step / steps_per_epoch),
                     eval_metrics)

  def evaluate_now(step):
    logging.info('Evaluating at step %d (epoch %.2f) on %s%s', step, step / steps_per_epoch,
                 config.eval_split, ' (10 crops)' if config.ten_crop_eval else '')
    t0 = time.time()
    result = run_evaluation(p_eval, rstate.params, config, ten_crop=config.ten_crop_eval,
                            workdir=workdir)
    lr.observe(result['eval/top1_error'])
    if meta['best_top1_error'] is None or result['eval/top1_error'] < meta['best_top1_error']:
      meta['best_top1_error'], meta['best_step'] = result['eval/top1_error'], step
    writer.write(step, result)
    logging.info('step %d: eval top-1 error %.2f%%, top-5 error %.2f%%, loss %.4f over %d '
                 'examples (%.1f s); lr now %.2g', step, 100 * result['eval/top1_error'],
                 100 * result['eval/top5_error'], result['eval/loss'],
                 result['eval/num_examples'], time.time() - t0, lr.value(step))
    return result

  step = start_step
  train_iter: Iterator = input_pipeline.train_iterator(config, start_step=start_step,
                                                       workdir=workdir)
  window_start, window_steps = time.time(), 0
  try:
    with _StopRequest() as stop:
      while step < total_steps:
        batch = steps.shard(next(train_iter))
        rstate, step_metrics = p_train(rstate, batch, np.float32(lr.value(step)))
        if step == start_step:
          jax.block_until_ready(step_metrics)
          logging.info('First step (compilation included) took %.1f s', time.time() - window_start)
          window_start = time.time()
        else:
          window_steps += 1
        step += 1
        pending.add(step, step_metrics)

        if step % config.log_every_steps == 0 or step == total_steps:
          history = pending.take()
          elapsed = time.time() - window_start
          ips = window_steps * config.batch_size / elapsed if window_steps else float('nan')
          scalars = dict(history[-1][1])
          for key in scalars:
            scalars[key] = float(np.mean([h[key] for _, h in history]))
          scalars['lr'] = lr.value(step - 1)
          scalars['train/images_per_sec'] = ips
          scalars['epoch'] = step / steps_per_epoch
          writer.write(step, scalars)
          eta = (total_steps - step) * config.batch_size / ips if ips == ips and ips else 0
          logging.info('step %d/%d  epoch %.2f/%g  loss %.4f  top-1 err %.3f  lr %.2g  '
                       '%.1f img/s  ETA %s', step, total_steps, step / steps_per_epoch,
                       total_steps / steps_per_epoch, scalars['train/loss'],
                       scalars['train/top1_error'], scalars['lr'], ips, _format_duration(eta))
          window_start, window_steps = time.time(), 0

        paused = time.time()  # Evaluations and saves do not count in training images/sec.
        did_eval = saved = False
        if step % eval_every == 0 or step == total_steps:
          last_eval = evaluate_now(step)
          did_eval = True
        if did_eval or step % config.checkpoint_every_steps == 0 or step == total_steps:
          save(step, last_eval if did_eval else None)
          saved = True
        window_start += time.time() - paused
        if stop.signal is not None:
          if not saved:
            save(step)
          logging.warning('Stopped at step %d on request; rerun the same command to resume.',
                          step)
          break
  finally:
    # Close the tf.data iterator explicitly: left to interpreter shutdown, its teardown measured
    # 35 s after a 20-epoch digits run.
    train_iter.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return last_eval


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir (config.json)."""
  path = os.path.join(os.path.expanduser(workdir), 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not the workdir of a run '
                            '(train one with `python main.py --config=... --workdir=...`).')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def load_trained(config: ml_collections.ConfigDict, workdir: str, *, which: str = 'best',
                 step: int | None = None) -> tuple[models.AlexNet, Any, int]:
  """(model, params, step) of a checkpoint of `workdir`: `step`, or the best or latest one.

  'best' is the checkpoint with the lowest validation top-1 error seen by the run (the latest
  when no evaluation has run yet).
  """
  if which not in ('best', 'latest'):
    raise ValueError(f"which={which!r}: choose 'best' or 'latest'")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    raise FileNotFoundError(f'No checkpoints in {workdir}: train first with '
                            f'`python main.py --config=... --workdir={workdir}`')
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, read_only=True)
  try:
    latest = manager.latest_step()
    if latest is None:
      raise FileNotFoundError(f'No checkpoint in {checkpoints.checkpoint_dir(workdir)}')
    if step is None:
      step = latest
      if which == 'best':
        best = checkpoints.restore_meta(manager, latest).get('best_step')
        step = best if best in manager.all_steps() else latest
    elif step not in manager.all_steps():
      raise FileNotFoundError(f'No checkpoint of step {step} in {workdir}; there are '
                              f'{sorted(manager.all_steps())}')
    model = models.create_model(config)
    tx = optim.create_optimizer(config)
    state = jax.tree_util.tree_map(np.asarray, steps.create_train_state(
        model, tx, config.seed, config.image_size))
    lr = optim.LearningRate(config, 1)
    state, _, _ = checkpoints.restore(manager, state, lr.state(), step=step)
  finally:
    manager.close()
  return model, state.params, step


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
             which: str = 'best') -> dict[str, float]:
  """Evaluates a checkpoint of `workdir` (the best, the latest, or `step`) on config.eval_split.

  Uses the 10-crop test when config.ten_crop_eval is set, the centre crop otherwise. Writes
  the result to workdir/eval_<split>_<crops>.json and returns it.
  """
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  model, params, step = load_trained(config, workdir, which=which, step=step)
  logging.info('Evaluating the checkpoint of step %d from %s', step, workdir)
  p_eval = steps.pmapped_eval_step(model)
  result = run_evaluation(p_eval, steps.replicate(params), config,
                          ten_crop=config.ten_crop_eval, workdir=workdir)
  result['step'] = step
  crops = 'ten_crop' if config.ten_crop_eval else 'center_crop'
  if jax.process_index() == 0:
    path = os.path.join(workdir, f'eval_{config.eval_split}_{crops}.json')
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  logging.info('step %d, %s, %s: top-1 error %.2f%%, top-5 error %.2f%% over %d examples',
               step, config.eval_split, crops, 100 * result['eval/top1_error'],
               100 * result['eval/top5_error'], result['eval/num_examples'])
  return result
