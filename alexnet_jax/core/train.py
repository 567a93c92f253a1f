"""The training loop: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

Side effects live here (files, logging, signals, devices); the steps themselves are pure
functions in `steps.py`, the evaluation is `evaluation.py`'s. A run is resumable at any step:
rerunning the same command on the same workdir continues from the latest checkpoint with the
same parameters, momentum, learning-rate schedule, RNG and position in the data, so it sees the
batches an uninterrupted run would see.
"""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import paths
from alexnet_jax import cli
from alexnet_jax.core import checkpoints
from alexnet_jax.core import config as config_lib
from alexnet_jax.core import evaluation
from alexnet_jax.core import kernels as kernels_lib
from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import models
from alexnet_jax.core import optim
from alexnet_jax.core import parallel
from alexnet_jax.core import run as run_lib
from alexnet_jax.core import steps
from alexnet_jax.core import transfer
from alexnet_jax.data import on_device
from alexnet_jax.data import pipeline as input_pipeline
from alexnet_jax.data import stats as data_stats
from alexnet_jax.errors import RunError
from alexnet_jax.errors import TrainingDivergedError


# Key of a checkpoint's JSON meta holding the per-step training metrics not logged yet.
UNLOGGED = 'unlogged_train_metrics'


def prepare(config: ml_collections.ConfigDict) -> kernels_lib.Kernels:
  """Checks `config` (`config.validate`) and resolves its kernels for this run's devices, once,
  before any work; logs the choice."""
  config_lib.validate(config)
  kernels = kernels_lib.resolve(config, jax.devices())
  logging.info('Kernels on %s: %s', jax.devices()[0].platform, kernels.describe())
  return kernels


class _StopRequest:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag that the next step carries to the stop vote
  (`steps.grads_and_metrics`): in a run of several processes, a signal to any one of them
  stops all of them after the same step."""

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
    logging.warning('Received %s: saving a checkpoint and stopping after the next step.',
                    signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


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
      host = {k: float(parallel.first_value(v)) for k, v in m.items()}
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


@contextlib.contextmanager
def _collective_errors():
  """In a run of several processes, a failed collective means another process is gone: say so
  in one line instead of XLA's runtime error."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    raise RunError(
        f'Process {jax.process_index()} of {jax.process_count()} lost the other processes: '
        f'{cli.one_line(e)[:300]}. Another process of the run probably stopped or was killed '
        '(see its log). Rerun the command on every host to resume from the last checkpoint.') from e


@contextlib.contextmanager
def _disk_errors():
  """A full disk (or a file-size limit, a read-only one) while writing metrics: one line naming
  the file and the cause, not a traceback."""
  try:
    yield
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
      raise
    raise RunError(f'Writing {e.filename or "a file of the run"} failed: {e.strerror}. The '
                   'latest checkpoint is intact; free the space and rerun the same command to '
                   'resume.') from e


class _Profile:
  """A JAX profiler trace of config.profile_steps steps, config.profile_after_steps steps after
  the run (re)starts, into workdir/profile (TensorBoard's profile plugin, or Perfetto for the
  perfetto_trace.json.gz next to it)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, start_step: int):
    self.first = start_step + config.profile_after_steps if config.profile_steps > 0 else None
    self.last = self.first + config.profile_steps if self.first is not None else None
    self.directory = str(paths.resolve(workdir) / 'profile')
    self.active = False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs: Any) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(outputs)  # The traced steps end inside the trace.
      self.close()
      logging.info('Profile of steps %d..%d written to %s', self.first + 1, self.last,
                   self.directory)

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config`'s network, evaluating and checkpointing into `workdir`; resumes if possible.

  Returns the last evaluation's metrics.
  """
  kernels = prepare(config)
  workdir = str(paths.resolve(workdir))
  is_main = jax.process_index() == 0
  info = input_pipeline.get_dataset_info(config)  # Checks the classes fit num_classes.
  steps_per_epoch = input_pipeline.steps_per_epoch(config, info)  # Checks one batch fits.
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  eval_every = (config.eval_every_steps if config.eval_every_steps > 0
                else max(1, int(config.eval_every_epochs * steps_per_epoch)))
  # Before anything is written: a config that cannot continue the workdir's checkpoints stops.
  changes = run_lib.check_resume(workdir, config)
  # A fine-tune's source is read before anything is written too (a new run only: a workdir
  # with checkpoints resumes from them).
  source = None
  if config.init_from and not checkpoints.complete_steps(checkpoints.checkpoint_dir(workdir)):
    source = transfer.read_source(config, workdir)
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  # Classes first: a workdir of other classes is refused before its config is overwritten.
  run_lib.record_classes(workdir, info.class_names, is_writer=is_main)
  for change in changes:
    safe = change.field in run_lib.RESUME_SAFE_FIELDS
    logging.log(logging.INFO if safe else logging.WARNING, 'Resuming with config.%s%s', change,
                '' if safe else ' (a change to the training: the run is no longer the '
                'uninterrupted run of either config)')
  if is_main:
    run_lib.write_config(workdir, config, kernels, changes)
  mean = data_stats.mean_to_subtract(config, data_stats.training_stats(config, workdir, is_main))
  logging.info('%s: %d training / %d eval examples, %d classes; %d steps of %d (%d per epoch) '
               'on %d devices', config.dataset, info.num_train, info.num_eval, info.num_classes,
               total_steps, config.batch_size, steps_per_epoch, jax.device_count())

  model, tx, state = steps.initial_state(config, kernels)
  lr = optim.LearningRate(config, steps_per_epoch)
  manager, restored = checkpoints.restore_latest_good(
      workdir, config.keep_checkpoints, state, lr.state(), is_writer=is_main)
  meta = {'best_top1_error': None, 'best_step': None}
  pending = _PendingMetrics()
  if restored is not None:
    state, schedule, meta = restored
    lr.restore(schedule)
    # Per-step metrics of the log window the checkpoint was saved in: the first log after the
    # resume averages the same steps as an uninterrupted run's.
    pending.checked = [(int(k), v) for k, v in meta.pop(UNLOGGED, [])]
    logging.info('Resuming from the checkpoint of step %d in %s', int(state.step),
                 manager.directory)
    if config.init_from:
      logging.info('config.init_from=%r is not read: the run resumes its own checkpoint.',
                   config.init_from)
  elif source is not None:
    started = transfer.start_from(source, state.params, optim.frozen_layers(config.freeze_through))
    state = state.replace(params=started.params)
  start_step = int(state.step)
  logging.info('Parameters: %s', f'{models.count_params(state.params):,}')

  finish = on_device.finisher(config, mean) if config.device_preprocessing else None
  placement = parallel.Placement(config, model, tx, state, finish=finish)
  if placement.mesh is not None:
    logging.info('Parallelism %r: mesh %s', config.parallelism, dict(placement.mesh.shape))
  p_train = placement.train_step
  p_eval = evaluation.pmapped_eval_step(model, config, mean)
  rstate = placement.put_state(state)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=start_step)
  last_eval: dict[str, float] = {}

  def save(step, eval_metrics=None):
    pending.check()  # Never checkpoint a diverged state: neither its loss...
    host = placement.host_state(rstate)
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host.params)):
      # ...nor its parameters (the last step's update can overflow while its loss, computed
      # before the update, is still finite).
      raise TrainingDivergedError(
          f'The parameters became NaN or infinite at step {step}. Stopping; the last good '
          'checkpoint is kept. Try a lower --config.learning_rate.')
    checkpoints.save(manager, step, host, lr.state(),
                     dict(meta, epoch=step / steps_per_epoch, **{UNLOGGED: pending.checked}),
                     eval_metrics)

  def evaluate_now(step):
    logging.info('Evaluating at step %d (epoch %.2f) on %s%s', step, step / steps_per_epoch,
                 config.eval_split, ' (10 crops)' if config.ten_crop_eval else '')
    t0 = time.time()
    result = evaluation.evaluate(p_eval, placement.eval_params(rstate), config,
                                 ten_crop=config.ten_crop_eval, mean=mean)
    # Checked before anything uses it: the plateau schedule, the best checkpoint, the metrics.
    if not all(math.isfinite(v) for v in result.values()):
      raise TrainingDivergedError(
          f'The evaluation at step {step} gave {result}: the network outputs NaN or infinite '
          'values. Stopping; the last good checkpoint is kept and this evaluation is not '
          'recorded. Try a lower --config.learning_rate.')
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
  train_iter: Iterator = input_pipeline.train_iterator(
      config, start_step=start_step, mean=mean, on_device=config.device_preprocessing)
  batches = placement.batches(train_iter, config.device_prefetch)
  profile = _Profile(config, workdir, start_step)
  window_start, window_steps = time.time(), 0
  votes = None  # stop votes of the step before the one just dispatched
  stopped_by_error = True
  try:
    with _StopRequest() as stop, _collective_errors(), _disk_errors():
      # (From here on SIGTERM and Ctrl-C stop the run after a step, with a checkpoint.)
      logging.info('Training steps %d to %d', start_step + 1, total_steps)
      while step < total_steps:
        profile.before(step)
        rstate, step_metrics, new_votes = p_train(
            rstate, next(batches), np.float32(lr.value(step)),
            placement.stop_votes(stop.signal is not None))
        if step == start_step:
          jax.block_until_ready(step_metrics)
          logging.info('First step (compilation included) took %.1f s', time.time() - window_start)
          window_start = time.time()
        else:
          window_steps += 1
        step += 1
        pending.add(step, step_metrics)
        profile.after(step, step_metrics)
        # Every process reads the same votes of step - 1 (waiting for that step, not this one,
        # so the device stays busy), hence all stop after this same step.
        stopping = votes is not None and int(parallel.first_value(votes))
        votes = new_votes

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
                       scalars['train/top1_error'], scalars['lr'], ips, cli.format_duration(eta))
          window_start, window_steps = time.time(), 0

        paused = time.time()  # Evaluations and saves do not count in training images/sec.
        did_eval = saved = False
        if step % eval_every == 0 or step == total_steps:
          pending.check()  # A diverged step is never evaluated (nor its evaluation recorded).
          last_eval = evaluate_now(step)
          did_eval = True
        if did_eval or step % config.checkpoint_every_steps == 0 or step == total_steps:
          save(step, last_eval if did_eval else None)
          saved = True
        window_start += time.time() - paused
        if stopping:
          if not saved:
            save(step)
          logging.warning('Stopped at step %d on request%s; rerun the same command to resume.',
                          step, ' (agreed by all %d processes)' % jax.process_count()
                          if jax.process_count() > 1 else '')
          break
    stopped_by_error = False
  finally:
    profile.close()
    # Close the tf.data iterator explicitly: left to interpreter shutdown, its teardown measured
    # 35 s after a 20-epoch digits run.
    train_iter.close()
    writer.close()
    try:
      checkpoints.finish(manager)
    except RunError:
      if not stopped_by_error:
        raise
      # Already stopping for another error (often this very save's): that one is reported.
  return last_eval


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
             which: str = 'best') -> dict[str, float]:
  """Evaluates a checkpoint of the run in `workdir` (the best, the latest, or `step`) on
  config.eval_split, with `config`'s network and test (10 crops if config.ten_crop_eval).

  Opens the run read-only (`run.open_run`: its checkpoint, statistics and classes). Writes
  the result to workdir/eval_<split>_<crops>.json, the product of `main.py --mode=eval`, and
  returns it.
  """
  kernels = prepare(config)
  run = run_lib.open_run(workdir)
  restored = run.restore(which=which, step=step, config=config, kernels=kernels)
  logging.info('Evaluating the checkpoint of step %d from %s', restored.step, run.workdir)
  mean = run.mean()
  result = evaluation.evaluate(evaluation.pmapped_eval_step(restored.model, config, mean),
                               parallel.replicate(restored.params), config,
                               ten_crop=config.ten_crop_eval, mean=mean)
  result['step'] = restored.step
  crops = 'ten_crop' if config.ten_crop_eval else 'center_crop'
  cli.write_json(str(paths.resolve(run.workdir) / f'eval_{config.eval_split}_{crops}.json'),
                 result)  # (process 0 writes it)
  logging.info('step %d, %s, %s: top-1 error %.2f%%, top-5 error %.2f%% over %d examples',
               restored.step, config.eval_split, crops, 100 * result['eval/top1_error'],
               100 * result['eval/top5_error'], result['eval/num_examples'])
  return result
