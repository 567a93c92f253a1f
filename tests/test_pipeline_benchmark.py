"""The input-pipeline benchmark runs end to end on a few small generated JPEGs."""

import os

import numpy as np
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
