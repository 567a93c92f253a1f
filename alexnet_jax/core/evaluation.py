"""The one evaluation path (§6): every evaluation of a network goes through here.

Training-time evaluation, `main.py --mode=eval`, the ensembles of `alexnet_jax.paper.evaluate`,
predict and the figures share:
- the preprocessing: `data.augment.eval_patches` (mean subtracted, then the centre or ten
  patches), applied by `data.pipeline.eval_iterator` or to single images;
- the probabilities: `steps.probabilities` (softmax, averaged over the ten patches);
- the counting: `metrics.error_sums` (loss, top-1 and top-5 errors over the real examples).
Each process evaluates its share of the split (every example once over all processes, padded
batches masked out) and the sums are global: `psum` over all devices inside the step, or
`global_sums` over the processes for probabilities gathered on the host.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from alexnet_jax.core import metrics as metrics_lib
from alexnet_jax.core import parallel
from alexnet_jax.data import on_device
from alexnet_jax.data import pipeline
from alexnet_jax.data import sources


def _batches(config, *, split: str | None, ten_crop: bool, mean: np.ndarray | None,
             max_batches: int | None = None, device: bool = False
             ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
  """(index, total, batch) of this process's evaluation batches, with progress logging."""
  name = split or config.eval_split
  total = pipeline.num_eval_batches_of(sources.open_split(config, name).num_examples, config)
  if max_batches is not None and max_batches > 0:
    total = min(total, max_batches)
  start = time.time()
  it = pipeline.eval_iterator(config, split=name, ten_crop=ten_crop, mean=mean,
                              on_device=device)
  try:
    for i, batch in enumerate(it):
      if i >= total:
        break
      yield i, total, batch
      if (i + 1) % max(1, total // 10) == 0 or i + 1 == total:
        logging.info('  eval %s%s: batch %d/%d (%.1f s)', name, ' (10 crops)' if ten_crop else '',
                     i + 1, total, time.time() - start)
  finally:
    it.close()


def pmapped_eval_step(model, config, mean: np.ndarray | None) -> Callable:
  """`parallel.pmapped_eval_step` for `evaluate`: with config.device_preprocessing, it finishes
  the uint8 patches on the device (`data.on_device`)."""
  finish = on_device.finisher(config, mean) if config.device_preprocessing else None
  return parallel.pmapped_eval_step(model, finish=finish)


def evaluate(p_eval: Callable, rparams: Any, config, *, ten_crop: bool,
             mean: np.ndarray | None, split: str | None = None) -> dict[str, float]:
  """Top-1/top-5 error and loss over the whole split, summed over every device and process.

  `p_eval` is `pmapped_eval_step(model, config, mean)`, `rparams` the replicated parameters.
  config.num_eval_steps > 0 evaluates only that many batches (tests).
  """
  sums = None
  for _, _, batch in _batches(config, split=split, ten_crop=ten_crop, mean=mean,
                              max_batches=config.num_eval_steps,
                              device=config.device_preprocessing):
    out = p_eval(rparams, parallel.shard(batch))
    sums = out if sums is None else jax.tree_util.tree_map(lambda a, b: a + b, sums, out)
  # psum made every device's copy the global sum.
  return metrics_lib.error_rates(
      {k: np.asarray(v.addressable_shards[0].data)[0] for k, v in sums.items()})


def split_probabilities(model, params: Any, config, *, ten_crop: bool,
                        mean: np.ndarray | None, split: str | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Class probabilities [n, C] and labels [n] of this process's share of a split, in order.

  n counts the readable examples this process evaluates (the padding is dropped). Processes
  take the same share whatever the config's batch size, so the probabilities of several runs of
  one dataset line up example by example (the ensembles of §6). `params` are host arrays.
  """
  p_probs = parallel.pmapped_probabilities(model)
  rparams = parallel.replicate(params)
  probs, labels = [], []
  for _, _, batch in _batches(config, split=split, ten_crop=ten_crop, mean=mean):
    out = np.asarray(p_probs(rparams, parallel.shard({'image': batch['image']})['image']))
    out = out.reshape((-1, out.shape[-1]))
    probs.append(out[batch['mask']])
    labels.append(batch['label'][batch['mask']])
  return np.concatenate(probs), np.concatenate(labels).astype(np.int32)


def errors_of(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """`metrics.error_rates` of probabilities computed on the host (e.g. averaged over models),
  counted with `metrics.error_sums` and summed over all processes."""
  sums = metrics_lib.error_sums(probs, labels, np.ones(len(labels), bool))
  return metrics_lib.error_rates(global_sums({k: float(v) for k, v in sums.items()}))


def global_sums(sums: dict[str, float]) -> dict[str, float]:
  """Each process's sums added up over all processes (every process gets the total)."""
  if jax.process_count() == 1:
    return sums
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  keys = sorted(sums)
  gathered = multihost_utils.process_allgather(np.array([sums[k] for k in keys], np.float64))
  return dict(zip(keys, np.asarray(gathered).sum(axis=0).tolist()))

