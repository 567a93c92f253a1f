"""The input-pipeline benchmark runs end to end on a few small generated JPEGs."""

import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.bench import pipeline as pipeline_benchmark
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
