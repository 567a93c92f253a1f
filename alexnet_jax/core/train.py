"""The training loop: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

Side effects live here (files, logging, signals, devices); the steps themselves are pure
functions in `steps.py`, the evaluation is `evaluation.py`'s. A run is resumable at any step:
rerunning the same command on the same workdir continues from the latest checkpoint with the
same parameters, momentum, learning-rate schedule, RNG and position in the data, so it sees the
batches an uninterrupted run would see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import signal
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import config as config_lib
from alexnet_jax import errors
from alexnet_jax import paths
from alexnet_jax import progress
from alexnet_jax.core import checkpoints
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
  """Checks `config` (`config.validate`, and `parallel.check` for its devices) and resolves its
  kernels for this run's devices, once, before any work; logs the choice."""
  config_lib.validate(config)
  parallel.check(config, jax.device_count(), jax.local_device_count())
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
        f'{errors.one_line(e)[:300]}. Another process of the run probably stopped or was killed '
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


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How long a run is and when it logs, evaluates and saves, in steps."""
  steps_per_epoch: int
  total_steps: int
  log_every: int
  eval_every: int
  save_every: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, info: Any) -> _Plan:
    steps_per_epoch = input_pipeline.steps_per_epoch(config, info)  # Checks one batch fits.
    return cls(steps_per_epoch,
               (config.num_train_steps if config.num_train_steps > 0
                else int(config.num_epochs * steps_per_epoch)),
               config.log_every_steps,
               (config.eval_every_steps if config.eval_every_steps > 0
                else max(1, int(config.eval_every_epochs * steps_per_epoch))),
               config.checkpoint_every_steps)

  def due(self, step: int, every: int) -> bool:
    """Whether `step` is one of every `every` steps; the last step always is."""
    return step % every == 0 or step == self.total_steps

  def epoch(self, step: int) -> float:
    return step / self.steps_per_epoch


@dataclasses.dataclass
class _Start:
  """Where a run starts: its network, optimizer, state (new, fine-tuned or resumed), schedule,
  checkpoint manager, data statistics and the metrics carried over in the checkpoint."""
  model: Any
  tx: Any
  state: steps.TrainState
  lr: optim.LearningRate
  manager: Any
  mean: Any
  meta: dict[str, Any]
  unlogged: list[tuple[int, dict[str, float]]]


def _start(config: ml_collections.ConfigDict, workdir: str, kernels: kernels_lib.Kernels,
           info: Any, plan: _Plan, is_main: bool) -> _Start:
  """Checks the workdir can take this run, records the run's config and classes, computes (or
  reads) the data statistics, and resumes the latest good checkpoint or starts anew (from
  config.init_from's parameters for a fine-tune)."""
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
               plan.total_steps, config.batch_size, plan.steps_per_epoch, jax.device_count())

  # The state's shapes first: a resumed run never draws the initialisation it would discard.
  model, tx, shapes = steps.initial_state(config, kernels, abstract=True)
  lr = optim.LearningRate(config, plan.steps_per_epoch)
  manager, restored = checkpoints.restore_latest_good(
      workdir, config.keep_checkpoints, shapes, lr.state(), is_writer=is_main)
  meta, unlogged = {'best_top1_error': None, 'best_step': None}, []
  if restored is not None:
    state, schedule, meta = restored
    lr.restore(schedule)
    # Per-step metrics of the log window the checkpoint was saved in: the first log after the
    # resume averages the same steps as an uninterrupted run's.
    unlogged = [(int(k), v) for k, v in meta.pop(UNLOGGED, [])]
    logging.info('Resuming from the checkpoint of step %d in %s', int(state.step),
                 manager.directory)
    if config.init_from:
      logging.info('config.init_from=%r is not read: the run resumes its own checkpoint.',
                   config.init_from)
  else:
    _, _, state = steps.initial_state(config, kernels)  # §5's initialisation from the seed
    if source is not None:
      started = transfer.start_from(source, state.params,
                                    optim.frozen_layers(config.freeze_through))
      state = state.replace(params=started.params)
  logging.info('Parameters: %s', f'{models.count_params(state.params):,}')
  return _Start(model, tx, state, lr, manager, mean, meta, unlogged)


class _LogWindow:
  """Training images/sec over the steps since the last log, evaluations and saves excluded;
  the first step (compilation) never counts."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.start, self.steps = time.time(), 0

  def stepped(self, first: bool) -> None:
    if first:
      self.start = time.time()
    else:
      self.steps += 1

  @contextlib.contextmanager
  def paused(self):
    t0 = time.time()
    yield
    self.start += time.time() - t0

  def take(self, batch_size: int) -> float | None:
    """Images/sec since the last `take` (None: no timed step yet), and a new window."""
    elapsed, steps_ = time.time() - self.start, self.steps
    self.start, self.steps = time.time(), 0
    return steps_ * batch_size / elapsed if steps_ else None


class _Loop:
  """What a run does between steps: logging, evaluating, saving (process 0 writes)."""

  def __init__(self, config, workdir, plan: _Plan, start: _Start, placement, is_main: bool):
    self.config, self.plan, self.placement = config, plan, placement
    self.lr, self.manager, self.meta, self.mean = start.lr, start.manager, start.meta, start.mean
    self.pending = _PendingMetrics()
    self.pending.checked = start.unlogged
    self.writer = metrics_lib.MetricWriter(workdir, enabled=is_main,
                                           resume_step=int(start.state.step))
    self.eval_step = evaluation.pmapped_eval_step(start.model, config, start.mean)
    self.window = _LogWindow()
    self.last_eval: dict[str, float] = {}

  def log(self, step: int) -> None:
    """Writes the mean of the window's per-step metrics, the learning rate and the speed."""
    history = self.pending.take()
    ips = self.window.take(self.config.batch_size)
    scalars = {key: float(np.mean([h[key] for _, h in history])) for key in history[-1][1]}
    scalars.update({'lr': self.lr.value(step - 1), 'epoch': self.plan.epoch(step),
                    'train/images_per_sec': float('nan') if ips is None else ips})
    self.writer.write(step, scalars)
    eta = (self.plan.total_steps - step) * self.config.batch_size / ips if ips else 0
    logging.info('step %d/%d  epoch %.2f/%g  loss %.4f  top-1 err %.3f  lr %.2g  '
                 '%.1f img/s  ETA %s', step, self.plan.total_steps, self.plan.epoch(step),
                 self.plan.epoch(self.plan.total_steps), scalars['train/loss'],
                 scalars['train/top1_error'], scalars['lr'], scalars['train/images_per_sec'],
                 progress.format_duration(eta))

  def evaluate(self, step: int, device_state: Any) -> dict[str, float]:
    """Evaluates at `step`, feeds the plateau schedule, keeps the best and records it."""
    self.pending.check()  # A diverged step is never evaluated (nor its evaluation recorded).
    config = self.config
    logging.info('Evaluating at step %d (epoch %.2f) on %s%s', step, self.plan.epoch(step),
                 config.eval_split, ' (10 crops)' if config.ten_crop_eval else '')
    t0 = time.time()
    result = evaluation.evaluate(self.eval_step, self.placement.eval_params(device_state),
                                 config, ten_crop=config.ten_crop_eval, mean=self.mean)
    # Checked before anything uses it: the plateau schedule, the best checkpoint, the metrics.
    if not all(math.isfinite(v) for v in result.values()):
      raise TrainingDivergedError(
          f'The evaluation at step {step} gave {result}: the network outputs NaN or infinite '
          'values. Stopping; the last good checkpoint is kept and this evaluation is not '
          'recorded. Try a lower --config.learning_rate.')
    self.lr.observe(result['eval/top1_error'])
    if (self.meta['best_top1_error'] is None
        or result['eval/top1_error'] < self.meta['best_top1_error']):
      self.meta['best_top1_error'], self.meta['best_step'] = result['eval/top1_error'], step
    self.writer.write(step, result)
    logging.info('step %d: eval top-1 error %.2f%%, top-5 error %.2f%%, loss %.4f over %d '
                 'examples (%.1f s); lr now %.2g', step, 100 * result['eval/top1_error'],
                 100 * result['eval/top5_error'], result['eval/loss'],
                 result['eval/num_examples'], time.time() - t0, self.lr.value(step))
    self.last_eval = result
    return result

  def save(self, step: int, device_state: Any, eval_metrics=None) -> None:
    """Checkpoints `step`, never a diverged state: neither its loss nor its parameters (the
    last update can overflow while its loss, computed before it, is still finite)."""
    self.pending.check()
    host = self.placement.host_state(device_state)
    if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host.params)):
      raise TrainingDivergedError(
          f'The parameters became NaN or infinite at step {step}. Stopping; the last good '
          'checkpoint is kept. Try a lower --config.learning_rate.')
    checkpoints.save(self.manager, step, host, self.lr.state(),
                     dict(self.meta, epoch=self.plan.epoch(step),
                          **{UNLOGGED: self.pending.checked}), eval_metrics)

  def after_step(self, step: int, device_state: Any) -> bool:
    """Logs, evaluates and saves as the plan says after `step`; returns whether it saved."""
    plan = self.plan
    if plan.due(step, plan.log_every):
      self.log(step)
    with self.window.paused():  # Evaluations and saves do not count in images/sec.
      evaluated = plan.due(step, plan.eval_every)
      if evaluated:
        self.evaluate(step, device_state)
      if evaluated or plan.due(step, plan.save_every):
        self.save(step, device_state, self.last_eval if evaluated else None)
        return True
    return False

  def close(self, stopped_by_error: bool) -> None:
    self.writer.close()
    try:
      checkpoints.finish(self.manager)
    except RunError:
      if not stopped_by_error:
        raise
      # Already stopping for another error (often this very save's): that one is reported.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config`'s network, evaluating and checkpointing into `workdir`; resumes if possible.

  Returns the last evaluation's metrics.
  """
  kernels = prepare(config)
  workdir = str(paths.resolve(workdir))
  is_main = jax.process_index() == 0
  info = input_pipeline.get_dataset_info(config)  # Checks the classes fit num_classes.
  plan = _Plan.of(config, info)
  start = _start(config, workdir, kernels, info, plan, is_main)
  finish = on_device.finisher(config, start.mean) if config.device_preprocessing else None
  placement = parallel.Placement(config, start.model, start.tx, start.state, finish=finish)
  if placement.mesh is not None:
    logging.info('Parallelism %r: mesh %s', config.parallelism, dict(placement.mesh.shape))
  loop = _Loop(config, workdir, plan, start, placement, is_main)
  device_state = placement.put_state(start.state)
  step = first = int(start.state.step)
  train_iter: Iterator = input_pipeline.train_iterator(
      config, start_step=first, mean=start.mean, on_device=config.device_preprocessing)
  batches = placement.batches(train_iter, config.device_prefetch)
  profile = _Profile(config, workdir, first)
  votes = None  # stop votes of the step before the one just dispatched
  stopped_by_error = True
  try:
    with _StopRequest() as stop, _collective_errors(), _disk_errors():
      # (From here on SIGTERM and Ctrl-C stop the run after a step, with a checkpoint.)
      logging.info('Training steps %d to %d', first + 1, plan.total_steps)
      loop.window.reset()
      while step < plan.total_steps:
        profile.before(step)
        device_state, step_metrics, new_votes = placement.train_step(
            device_state, next(batches), np.float32(start.lr.value(step)),
            placement.stop_votes(stop.signal is not None))
        if step == first:
          jax.block_until_ready(step_metrics)
          logging.info('First step (compilation included) took %.1f s',
                       time.time() - loop.window.start)
        loop.window.stepped(first=step == first)
        step += 1
        loop.pending.add(step, step_metrics)
        profile.after(step, step_metrics)
        # Every process reads the same votes of step - 1 (waiting for that step, not this one,
        # so the device stays busy), hence all stop after this same step.
        stopping = votes is not None and int(parallel.first_value(votes))
        votes = new_votes
        saved = loop.after_step(step, device_state)
        if stopping:
          if not saved:
            loop.save(step, device_state)
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
    loop.close(stopped_by_error)
  return loop.last_eval


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
  paths.write_json(str(paths.resolve(run.workdir) / f'eval_{config.eval_split}_{crops}.json'),
                 result)  # (process 0 writes it)
  logging.info('step %d, %s, %s: top-1 error %.2f%%, top-5 error %.2f%% over %d examples',
               restored.step, config.eval_split, crops, 100 * result['eval/top1_error'],
               100 * result['eval/top5_error'], result['eval/num_examples'])
  return result
