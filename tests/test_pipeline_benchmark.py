"""The input-pipeline benchmark runs end to end on a few small generated JPEGs."""

import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.bench import pipeline as pipeline_benchmark
from alexnet_jax.bench import preparation
from alexnet_jax.data import prepare
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
def test_share_nothing_processes_prepare_every_image_once(tmp_path):
  """Two fresh processes at once, each on every other shard: together they write every image,
  counted by themselves; the rate is over the span from the first start to the last end."""
  pipeline_benchmark.write_jpegs(str(tmp_path), 20, long_side=64)
  settings = pipeline_benchmark.folder_settings(str(tmp_path), shard_size=4)
  _, shards = prepare.plan(settings)
  assert len(shards) == 5
  row = preparation.measure(settings, shards, processes=2, threads=1)
  assert row['images'] == 20 and row['cores_busy'] > 0
  assert row['images_per_sec'] == pytest.approx(20 / row['seconds'], rel=0.01)


def test_preparation_modes_take_turns_and_their_medians_are_compared(tmp_path, monkeypatch):
  calls = []
  rates = {(1, 1): [300, 100, 200], (1, 2): [450, 500, 400], (2, 1): [480, 470, 600]}

  def measure(settings, shards, processes, threads):
    del settings
    calls.append((processes, threads))
    rate = rates[processes, threads][sum(c == calls[-1] for c in calls) - 1]
    return {'images': sum(len(s.items) for s in shards), 'seconds': 1.0, 'images_per_sec': rate,
            'cores_busy': 1.0}

  monkeypatch.setattr(preparation, 'measure', measure)
  pipeline_benchmark.write_jpegs(str(tmp_path), 8, long_side=64)
  result = preparation.compare(str(tmp_path), workers=2, rounds=3, shard_size=4)
  assert calls == [(1, 1), (1, 2), (2, 1)] * 3  # in rotation, not one mode's turns in a row
  assert result['median_images_per_sec'] == {'1_thread': 200, '2_threads': 450,
                                             '2_processes': 480}
  assert result['threads_vs_1_thread'] == 2.25
  assert result['threads_vs_processes'] == pytest.approx(450 / 480, abs=1e-3)
  assert result['processes_vs_1_thread'] == 2.4
  assert result['images'] == 8 and result['shards'] == 2


def test_preparation_benchmark_needs_a_shard_per_process(tmp_path):
  pipeline_benchmark.write_jpegs(str(tmp_path), 3, long_side=64)
  with pytest.raises(UserError, match='too few to split among --workers=2'):
    preparation.compare(str(tmp_path), workers=2, rounds=1, shard_size=4)
