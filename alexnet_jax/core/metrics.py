"""Losses, top-k errors, and the metric writers (TensorBoard event files and metrics.jsonl)."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import optax

from alexnet_jax import paths


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy (the multinomial logistic regression objective, §3)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def topk_errors(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the true label is not strictly among the k highest `scores` (§6: top-1/top-5).

  Counted so that it cannot flatter: a class scoring as high as the true one (a tie, real with
  bfloat16 logits or probabilities that underflow to 0) ranks above it, and a row with a NaN or
  infinite score is wrong. The true class is right only if fewer than k other classes score at
  least as high and every score of the row is finite.
  """
  true_score = jnp.take_along_axis(scores, labels[:, None], axis=-1)
  at_least_as_high = jnp.sum(scores >= true_score, axis=-1) - 1  # the true class itself out
  finite = jnp.all(jnp.isfinite(scores), axis=-1)
  return ((at_least_as_high >= k) | ~finite).astype(jnp.float32)


def error_sums(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sums over the real (mask=True) examples of the loss and the top-1/top-5 errors (§6).

  `probs` are class probabilities [B, C] (softmax outputs, or their average over crops or
  models). Every evaluation counts its errors with this one function: training-time
  evaluation, `--mode=eval` and the ensembles of `alexnet_jax.paper.evaluate`.
  """
  mask = jnp.asarray(mask, bool)
  nll = -jnp.log(jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0] + 1e-12)
  # where, not a product: a padding example's value never reaches the sums, not even a NaN.
  masked_sum = lambda v: jnp.sum(jnp.where(mask, v, 0.0))
  return {
      'loss': masked_sum(nll),
      'top1_errors': masked_sum(topk_errors(probs, labels, 1)),
      'top5_errors': masked_sum(topk_errors(probs, labels, min(5, probs.shape[-1]))),
      'count': jnp.sum(mask.astype(jnp.float32)),
  }


def error_rates(sums: Mapping[str, Any]) -> dict[str, float]:
  """`error_sums` (added up over batches, devices and processes) as the reported averages."""
  count = max(float(sums['count']), 1.0)
  return {'eval/loss': float(sums['loss']) / count,
          'eval/top1_error': float(sums['top1_errors']) / count,
          'eval/top5_error': float(sums['top5_errors']) / count,
          'eval/num_examples': float(sums['count'])}


def top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(labels [N, k], scores [N, k]) of the k highest `scores`, highest first (for showing
  predictions, §6 / Figure 4; the errors are counted by `topk_errors`)."""
  values, labels = jax.lax.top_k(jnp.asarray(scores), min(k, scores.shape[-1]))
  return labels, values


class MetricWriter:
  """Writes scalars to TensorBoard event files and to `workdir/metrics.jsonl` (process 0 only).

  metrics.jsonl holds one JSON object per line: {"step": N, "train/loss": ..., ...}.

  `resume_step`: the step the run (re)starts from. Records of later steps, written by an earlier
  attempt that stopped before its next checkpoint, are removed (with a half-written last line),
  so that the rerun's records of those steps do not appear twice.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._lines: list[str] = []  # all lines, where the file is rewritten (cloud storage)
    if enabled:
      workdir = paths.resolve(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._path = workdir / 'metrics.jsonl'
      if resume_step is not None and self._path.exists():
        self._drop_after(resume_step)
      if paths.is_url(workdir):  # Object stores cannot append: the file is rewritten whole.
        self._lines = self._path.read_text().splitlines(True) if self._path.exists() else []
      else:
        self._jsonl = self._path.open('a', encoding='utf-8')
      try:
        if tensorboard:
          # tf.summary directly: flax.metrics.tensorboard imports TensorBoard's hparams plugin,
          # which imports all of Keras (~3 s of every start; it writes ~/.keras).
          import tensorflow as tf  # pylint: disable=g-import-not-at-top
          self._tb = tf.summary.create_file_writer(str(workdir / 'tensorboard'))  # URLs too
          self._scalar = tf.summary.scalar
      except ImportError:  # TensorBoard is optional; metrics.jsonl always works.
        self._tb = None

  def _drop_after(self, step: int) -> None:
    lines = self._path.read_text(encoding='utf-8').splitlines(True)
    kept = []
    for line in lines:
      try:
        if line.endswith('\n') and json.loads(line)['step'] <= step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):  # A line cut by a crash: not a record.
        pass
    if len(kept) < len(lines):
      logging.warning('%s: removed %d records after step %d, written by an earlier attempt '
                      'that stopped after its last checkpoint; this run writes them again.',
                      self._path, len(lines) - len(kept), step)
      paths.write_atomic(self._path, ''.join(kept))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    for key, value in scalars.items():
      value = float(value)
      record[key] = value if math.isfinite(value) else str(value)
      if self._tb is not None:
        with self._tb.as_default():
          self._scalar(key, value, step=int(step))
    if self._tb is not None:
      self._tb.flush()
    record['time'] = time.time()
    line = json.dumps(record) + '\n'
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._lines.append(line)
      paths.write_atomic(self._path, ''.join(self._lines))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file back into a list of dicts."""
  text = paths.resolve(path).read_text(encoding='utf-8')
  return [json.loads(line) for line in text.splitlines() if line.strip()]
