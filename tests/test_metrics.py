"""alexnet_jax/core/metrics.py: top-k errors that cannot flatter (ties, NaN), and their sums."""

import numpy as np
import pytest

from alexnet_jax.core import metrics


def _reference_errors(scores, labels, k):
  """Row by row in plain Python: wrong unless every score is finite and fewer than k other
  classes score at least as high as the true one."""
  out = []
  for row, label in zip(np.asarray(scores, np.float64), labels):
    if not np.all(np.isfinite(row)):
      out.append(1.0)
      continue
    others = sum(1 for j, v in enumerate(row) if j != label and v >= row[label])
    out.append(float(others >= k))
  return np.array(out)


def test_ties_count_against_the_prediction():
  scores = np.array([[0.5, 0.5, 0.0],   # true class tied for first
                     [0.2, 0.3, 0.5],   # third
                     [0.1, 0.6, 0.3],   # second
                     [0.0, 0.0, 0.0],   # all tied: a saturated softmax's zeros
                     [0.7, 0.2, 0.1]])  # strictly first
  labels = np.array([1, 0, 2, 2, 0])
  for k, expected in ((1, [1, 1, 1, 1, 0]), (2, [0, 1, 0, 1, 0]), (3, [0, 0, 0, 0, 0])):
    got = np.asarray(metrics.topk_errors(scores, labels, k))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, _reference_errors(scores, labels, k))


def test_nan_or_infinite_scores_are_errors():
  scores = np.array([[np.nan, 0.1, 0.2], [0.1, np.nan, 0.2], [np.inf, 0.1, 0.2],
                     [0.1, 0.9, 0.0]], np.float32)
  labels = np.array([0, 2, 0, 1])
  for k in (1, 2, 3):
    np.testing.assert_array_equal(metrics.topk_errors(scores, labels, k), [1, 1, 1, 0])
  # A diverged network cannot report 0% error: every NaN row is wrong.
  nan = np.full((4, 10), np.nan, np.float32)
  assert float(np.mean(metrics.topk_errors(nan, np.arange(4), 5))) == 1.0


def test_random_scores_with_ties_match_the_reference():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, size=(200, 8)).astype(np.float32)  # many ties
  scores[rng.random(200) < 0.05, 3] = np.nan
  labels = rng.integers(0, 8, 200)
  for k in (1, 5):
    np.testing.assert_array_equal(metrics.topk_errors(scores, labels, k),
                                  _reference_errors(scores, labels, k))


def test_error_sums_leave_padding_out_even_when_it_is_nan():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [np.nan, np.nan]], np.float32)
  labels = np.array([0, 0, 1])
  sums = metrics.error_sums(probs, labels, np.array([True, True, False]))
  assert float(sums['count']) == 2 and float(sums['top1_errors']) == 1
  assert float(sums['loss']) == pytest.approx(-np.log(0.9) - np.log(0.2), rel=1e-5)
  rates = metrics.error_rates(metrics.error_sums(probs, labels, np.ones(3, bool)))
  assert rates['eval/top1_error'] == pytest.approx(2 / 3) and np.isnan(rates['eval/loss'])
