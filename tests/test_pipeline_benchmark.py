"""The input-pipeline benchmark runs end to end on a few small generated JPEGs."""

import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.bench import pipeline as pipeline_benchmark
from alexnet_jax.bench import preparation
from alexnet_jax.errors import UserError
from configs import alexnet


def test_generated_jpegs_are_imagenet_like(tmp_path):
  pipeline_benchmark.write_jpegs(str(tmp_path), 6, num_classes=2)
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs)
  assert len(files) == 6 and len(os.listdir(tmp_path / 'train')) == 2
  for path in files:
    with Image.open(path) as image:
      assert image.format == 'JPEG' and image.mode == 'RGB'
      assert min(pipeline_benchmark.LONG_SIDE_RANGE) <= max(image.size) <= max(
          pipeline_benchmark.LONG_SIDE_RANGE)
      assert np.asarray(image).std() > 10  # not a flat image


def test_benchmark_reports_a_throughput(tmp_path):
  pipeline_benchmark.write_jpegs(str(tmp_path), 8, long_side=64)
  result = pipeline_benchmark.benchmark(alexnet.get_config(), str(tmp_path), batches=2, warmup=1,
                                      batch_size=4)
  assert result['images_per_sec'] > 0 and result['num_files'] == 8


def test_readers_are_compared_on_the_same_prepared_images(tmp_path):
  pipeline_benchmark.write_jpegs(str(tmp_path / 'jpegs'), 16, long_side=300)
  config = alexnet.get_config()
  config.batch_size = 4
  rows = pipeline_benchmark.compare_readers(config, str(tmp_path / 'jpegs'), batches=2,
                                            warmup=1, cores=(1,), rounds=2)
  (row,) = rows
  assert row['cores'] == 1 and row['images'] == 16 and row['batch_size'] == 4
  for key in ('ours', 'plain_tf_data', 'bare_decode'):
    assert row[key] > 0, key
    # Each reader took its turns; its figure is their median (of two: their mean).
    assert len(row['turns'][key]) == 2
    assert row[key] == pytest.approx(np.mean(row['turns'][key]), abs=1)
  assert row['ours_vs_bare_decode'] == pytest.approx(row['ours'] / row['bare_decode'], abs=2e-3)


@pytest.mark.slow
def test_preparation_is_measured_against_share_nothing_processes(tmp_path):
  """Each of the three measurements prepares every image once (the 2 processes split the shards
  between them) in fresh processes; the ratios are those of the rates."""
  pipeline_benchmark.write_jpegs(str(tmp_path), 20, long_side=64)
  result = preparation.compare(str(tmp_path), workers=2, rounds=1, shard_size=4)
  assert result['images'] == 20 and result['shards'] == 5 and result['workers'] == 2
  median = result['median_images_per_sec']
  assert set(result['turns']) == set(median) == {'1_thread', '2_threads', '2_processes'}
  for mode, (turn,) in result['turns'].items():
    assert turn['images'] == 20, mode  # written, counted by the processes themselves
    assert turn['cores_busy'] > 0, mode
    assert median[mode] == turn['images_per_sec'] == pytest.approx(20 / turn['seconds'], rel=0.01)
  assert result['threads_vs_processes'] == pytest.approx(
      median['2_threads'] / median['2_processes'], abs=2e-3)
  assert result['threads_vs_1_thread'] == pytest.approx(
      median['2_threads'] / median['1_thread'], abs=2e-3)


def test_preparation_benchmark_needs_a_shard_per_process(tmp_path):
  pipeline_benchmark.write_jpegs(str(tmp_path), 3, long_side=64)
  with pytest.raises(UserError, match='too few to split among --workers=2'):
    preparation.compare(str(tmp_path), workers=2, rounds=1, shard_size=4)
