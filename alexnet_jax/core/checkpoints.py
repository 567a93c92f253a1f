"""Orbax checkpoints of a run: the last few, and the best by validation top-1 error.

A checkpoint holds the whole TrainState (parameters, optimizer state with the momentum, step,
base RNG key), the learning-rate schedule's state and a little JSON (epoch, best error). The
position in the data is the step itself: the input pipeline replays its deterministic order from
any step. Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a crash mid-save never leaves a half-written "latest" checkpoint: such a temporary directory is
not a step, is never restored, and is removed when the run restarts.

A checkpoint damaged later (a truncated or deleted file) is detected when it is restored:
`restore_latest_good` moves it to workdir/checkpoints_damaged/ (kept, not deleted) and resumes
from the newest one that restores, saying how many steps the run repeats; with none left it
stops, never starting again from scratch over a workdir that has checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax import distributed
from alexnet_jax import errors
from alexnet_jax import paths
from alexnet_jax.errors import RunError

BEST_METRIC = 'eval/top1_error'
DAMAGED_DIRNAME = 'checkpoints_damaged'


def checkpoint_dir(workdir: str) -> str:
  return str(paths.resolve(workdir) / 'checkpoints')


def create_manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the `keep` most recent checkpoints and, besides them, the best by BEST_METRIC."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(keep),
      # BestN keeps the highest values of get_metric_fn: negate the error.
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m[BEST_METRIC], n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  # A save cut short (kill -9) leaves its temporary directory: removed when the run restarts.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                         read_only=read_only,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, schedule: Any,
         meta: dict[str, Any], eval_metrics: dict[str, float] | None = None) -> None:
  """Saves host (NumPy) pytrees `state` and `schedule` plus JSON `meta` at `step` (async)."""
  metrics = None
  if eval_metrics is not None and BEST_METRIC in eval_metrics:
    metrics = {BEST_METRIC: float(eval_metrics[BEST_METRIC])}
  if step in manager.all_steps():
    return  # Saved already (e.g. a signal right after a periodic save).
  # Host NumPy arrays, the same on every process: with several processes Orbax writes them once
  # (a jax.Array on one device would count as a process-local shard it cannot save).
  state, schedule = jax.tree_util.tree_map(np.asarray, (state, schedule))
  with _save_errors(manager):  # (this save, or the previous one still in the background)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), schedule=ocp.args.StandardSave(schedule),
        meta=ocp.args.JsonSave(meta)), metrics=metrics)
  logging.info('Saving the checkpoint of step %d to %s (in the background)', step,
               manager.directory)


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in the background and closes `manager`; a failed save is a RunError
  (see `save`)."""
  with _save_errors(manager):
    try:
      manager.wait_until_finished()
    finally:
      manager.close()


def complete_steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints in `directory` (renamed from their temporary name)."""
  directory = paths.resolve(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# Causes of a failed write the user can act on, as the OS (or TensorStore, quoting it) says them.
_CAUSES = ('No space left on device', 'Disk quota exceeded', 'File too large',
           'Read-only file system', 'Permission denied', 'Input/output error')


@contextlib.contextmanager
def _save_errors(manager: ocp.CheckpointManager):
  """A save that fails (a full disk, a file-size limit, permissions...) stops the run with a
  RunError naming the directory, the cause and the checkpoint that stays the latest."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (TensorStore raises ValueError)
    text = errors.one_line(e)
    cause = next((c for c in _CAUSES if c in text), 'see the message below')
    good = complete_steps(str(manager.directory))
    raise RunError(
        f'Writing a checkpoint to {manager.directory} failed: {cause}. '
        + (f'The checkpoint of step {good[-1]} is intact and stays the latest; '
           if good else 'No checkpoint was complete yet; ')
        + f'free the space (or fix the cause) and rerun the same command to resume. '
        f'({text[:400]})') from e


def restore(manager: ocp.CheckpointManager, state_like: Any, schedule_like: Any,
            step: int | None = None) -> tuple[Any, Any, dict[str, Any]] | None:
  """Restores (state, schedule, meta) at `step` (latest if None); None if there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract(state_like)),
      schedule=ocp.args.StandardRestore(abstract(schedule_like)),
      meta=ocp.args.JsonRestore()))
  return restored['state'], restored['schedule'], restored['meta']


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """Only the JSON part of the checkpoint at `step` (epoch, best error and its step)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


# What TensorStore prints (from C++, past any Python hook) for each read of a failed restore that
# completes after Orbax closed the restore's event loop: a traceback per read, no information.
_TEARDOWN_NOISE = re.compile(
    r'Traceback \(most recent call last\):\n(?:  File "[^\n]*asyncio/base_events.py"[^\n]*\n'
    r'(?:    [^\n]*\n)*?)+RuntimeError: Event loop is closed\n')


@contextlib.contextmanager
def _teardown_noise_dropped(grace_s: float = 0.5):
  """Holds back what is written to file descriptor 2 inside the block and writes it back without
  `_TEARDOWN_NOISE`. When the block raises (a failed restore), it first waits `grace_s` for the
  failed restore's other reads to finish (and print)."""
  sys.stderr.flush()
  read_end, write_end = os.pipe()
  saved = os.dup(2)
  chunks = []
  reader = threading.Thread(target=lambda: chunks.extend(iter(
      lambda: os.read(read_end, 65536), b'')), daemon=True)
  reader.start()
  os.dup2(write_end, 2)
  try:
    yield
  except Exception:
    time.sleep(grace_s)
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(write_end)
    reader.join(timeout=5)
    os.close(read_end)
    text = _TEARDOWN_NOISE.sub('', b''.join(chunks).decode('utf-8', 'replace'))
    if text:
      sys.stderr.write(text)
      sys.stderr.flush()


def restore_latest_good(workdir: str, keep: int, state_like: Any, schedule_like: Any,
                        is_writer: bool = True
                        ) -> tuple[ocp.CheckpointManager, tuple[Any, Any, dict] | None]:
  """(manager, restored): the run's manager (`create_manager`) and the newest checkpoint that
  restores whole, as `restore` gives it (None where the workdir has no checkpoint).

  Newer checkpoints that fail to restore (damaged files) are named in a warning and, once a
  good one is found, moved by the `is_writer` process to workdir/checkpoints_damaged/ so that
  the run can save those steps again. Raises RunError when there are checkpoints and none
  restores (and then moves nothing). Every process of a run calls it.
  """
  manager = create_manager(workdir, keep)
  damaged, restored = [], None
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      with _teardown_noise_dropped():
        restored = restore(manager, state_like, schedule_like, step=step)
      break
    except Exception as e:  # pylint: disable=broad-except  (damage shows as OSError, ValueError..)
      damaged.append((step, errors.one_line(e)[:300]))
      logging.warning('The checkpoint of step %d in %s cannot be restored: %s', step,
                      manager.directory, damaged[-1][1])
  if damaged and restored is None:
    manager.close()
    raise RunError(
        f'No checkpoint in {checkpoint_dir(workdir)} can be restored ('
        + '; '.join(f'step {s}: {r}' for s, r in damaged) + '). Stopping rather than starting '
        'again from scratch over them: restore their files from a backup, or use a new --workdir.')
  if damaged:
    target = paths.resolve(workdir) / DAMAGED_DIRNAME
    step = int(restored[0].step)
    logging.warning(
        'Resuming from the checkpoint of step %d instead of step %d: the run repeats %d steps. '
        'The damaged checkpoints (steps %s) are moved to %s.', step, damaged[0][0],
        damaged[0][0] - step, ', '.join(str(s) for s, _ in damaged), target)
    if is_writer:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      target.mkdir(parents=True, exist_ok=True)
      for bad, _ in damaged:
        (paths.resolve(checkpoint_dir(workdir)) / str(bad)).rename(target / f'{bad}-{stamp}')
  # Every process, damage or not: the moves are done after it.
  distributed.barrier('alexnet_jax: damaged checkpoints moved')
  manager.reload()
  return manager, restored
