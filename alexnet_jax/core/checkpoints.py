"""Orbax checkpoints of a run: the last few, and the best by validation top-1 error.

A checkpoint holds the whole TrainState (parameters, optimizer state with the momentum, step,
base RNG key), the learning-rate schedule's state and a little JSON (epoch, best error). The
position in the data is the step itself: the input pipeline replays its deterministic order from
any step. Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a crash mid-save never leaves a half-written "latest" checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax import paths

BEST_METRIC = 'eval/top1_error'


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
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                         read_only=read_only)
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
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), schedule=ocp.args.StandardSave(schedule),
      meta=ocp.args.JsonSave(meta)), metrics=metrics)
  logging.info('Checkpoint of step %d written to %s', step, manager.directory)


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
