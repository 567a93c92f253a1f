"""The pipeline's contracts: determinism, exact resume, exact masked evaluation, sharding.

Examples are identified by their pixels: with augmentation off and image_size == resize_size a
digits batch holds the §2 squares themselves, which `data_sources.digits_arrays` gives
independently.
"""

import collections
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from alexnet_jax.data import augment
from alexnet_jax.data import sources as data_sources
from alexnet_jax.data import stats as data_stats
from alexnet_jax.data import pipeline as input_pipeline
from alexnet_jax.bench import pipeline as pipeline_benchmark
from configs import alexnet

import conftest


def _digits_config(**overrides):
  return conftest.config('digits', **overrides)


def _plain_digits_config(**overrides):
  """Digits with no augmentation and no mean: outputs are the squares themselves."""
  return _digits_config(**{'image_size': 32, 'random_crop': False, 'mean': None, **overrides})


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _keys(images):
  return [np.asarray(image, np.uint8).tobytes() for image in images]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['label'], y['label'])
    np.testing.assert_array_equal(x['image'], y['image'])


def _single_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


def test_train_batches_have_the_promised_shapes():
  config = _digits_config()
  batch = next(input_pipeline.train_iterator(config, mean=None))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (64, 28, 28, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32


def test_each_epoch_is_a_fresh_permutation_without_repeats():
  config = _plain_digits_config()
  train_x, _ = data_sources.digits_arrays(32)['train']
  info = input_pipeline.get_dataset_info(config)
  steps = input_pipeline.steps_per_epoch(config, info)
  assert steps == 1437 // 64
  batches = _take(input_pipeline.train_iterator(config, mean=None), 2 * steps)
  available = collections.Counter(_keys(train_x))
  epochs = []
  for e in range(2):
    images = np.concatenate([b['image'] for b in batches[e * steps:(e + 1) * steps]])
    seen = collections.Counter(_keys(images))
    assert all(seen[k] <= available[k] for k in seen)  # no example twice in an epoch
    assert sum(seen.values()) == steps * 64
    epochs.append(_keys(images))
  assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_same_seed_same_batches_other_seed_other_batches():
  config = _digits_config()
  first = _take(input_pipeline.train_iterator(config, mean=None), 3)
  _assert_same_batches(first, _take(input_pipeline.train_iterator(config, mean=None), 3))
  other = next(input_pipeline.train_iterator(_digits_config(seed=1), mean=None))
  assert not np.array_equal(other['image'], first[0]['image'])


def test_resume_gives_the_uninterrupted_batches_digits():
  config = _digits_config()  # random crops and the channel mean on
  steps = 1437 // 64
  uninterrupted = _take(input_pipeline.train_iterator(config, mean=None), steps + 3)
  for start in (1, steps - 1, steps, steps + 2):
    resumed = _take(input_pipeline.train_iterator(config, start_step=start, mean=None),
                    steps + 3 - start)
    _assert_same_batches(resumed, uninterrupted[start:])


def test_resume_gives_the_uninterrupted_batches_tfds_stream(tmp_path):
  config = alexnet.get_config()
  config.update({'dataset': 'mnist', 'data_dir': str(tmp_path), 'num_classes': 10,
                 'resize_size': 16, 'image_size': 12, 'batch_size': 8, 'mean': 'channel',
                 'shuffle_buffer': 16})
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    assert input_pipeline.steps_per_epoch(config, input_pipeline.get_dataset_info(config)) == 5
    uninterrupted = _take(input_pipeline.train_iterator(config, mean=None), 12)
    for start in (3, 5, 11):
      resumed = _take(input_pipeline.train_iterator(config, start_step=start, mean=None),
                      12 - start)
      _assert_same_batches(resumed, uninterrupted[start:])
  # The shuffle buffer reorders each epoch differently.
  assert not np.array_equal(uninterrupted[0]['label'], uninterrupted[5]['label'])


def _folder_with_corrupt_files(root):
  pipeline_benchmark.write_jpegs(str(root), 30, num_classes=3, long_side=24)
  pipeline_benchmark.write_jpegs(str(root), 11, split='val', num_classes=3, long_side=24, seed=1)
  (root / 'train/class_01/bad.jpg').write_bytes(b'this is not an image')
  good = (root / 'train/class_02/img_00002.jpg').read_bytes()
  (root / 'train/class_02/truncated.jpg').write_bytes(good[:200])
  (root / 'val/class_00/bad.png').write_bytes(b'\x89PNG garbage')
  config = alexnet.get_config()
  config.update({'dataset': 'folder', 'data_dir': str(root), 'eval_split': 'val',
                 'num_classes': 3, 'resize_size': 16, 'image_size': 12, 'batch_size': 8,
                 'eval_batch_size': 4, 'mean': 'image'})
  return config


def test_folder_skips_unreadable_images_and_stays_resumable(tmp_path, caplog):
  config = _folder_with_corrupt_files(tmp_path / 'data')
  workdir = str(tmp_path / 'work')
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_train, info.num_eval) == (32, 12)  # files, readable or not
  mean = data_stats.mean_to_subtract(config, data_stats.training_stats(config, workdir))
  assert os.path.exists(os.path.join(workdir, data_stats.STATS_FILENAME))
  uninterrupted = _take(input_pipeline.train_iterator(config, mean=mean), 9)
  assert all(b['image'].shape == (8, 12, 12, 3) for b in uninterrupted)  # always full
  assert np.all(np.isfinite(np.concatenate([b['image'] for b in uninterrupted])))
  # Both unreadable files were met (4 steps cover all 32 files) and logged by path.
  log = caplog.text
  assert 'bad.jpg' in log and 'truncated.jpg' in log and '(2 so far)' in log
  for start in (2, 4, 7):
    resumed = _take(input_pipeline.train_iterator(config, start_step=start, mean=mean),
                    9 - start)
    _assert_same_batches(resumed, uninterrupted[start:])
  assert info.class_names == ('class_00', 'class_01', 'class_02')
  # Evaluation: the 11 readable images once each, the unreadable one reported.
  batches = list(input_pipeline.eval_iterator(config, mean=mean))
  assert len(batches) == input_pipeline.num_eval_batches_of(info.num_eval, config) == 3
  assert sum(b['mask'].sum() for b in batches) == 11
  assert 'left out 1 unreadable images' in caplog.text and 'bad.png' in caplog.text


@pytest.mark.parametrize('eval_batch_size', [120, 128, 7])  # divides 360, does not, tiny
def test_eval_covers_every_example_exactly_once(eval_batch_size):
  config = _plain_digits_config(eval_batch_size=eval_batch_size)
  test_x, test_y = data_sources.digits_arrays(32)['test']
  info = input_pipeline.get_dataset_info(config)
  batches = list(input_pipeline.eval_iterator(config, mean=None))
  assert len(batches) == input_pipeline.num_eval_batches_of(info.num_eval, config)
  assert len(batches) == -(-360 // eval_batch_size)
  assert all(b['image'].shape == (eval_batch_size, 32, 32, 3) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.dtype == bool and mask.sum() == 360 and np.all(mask[:360])  # padding at the end
  images = np.concatenate([b['image'] for b in batches])[mask]
  labels = np.concatenate([b['label'] for b in batches])[mask]
  assert collections.Counter(zip(_keys(images), labels)) == collections.Counter(
      zip(_keys(test_x), test_y))


def test_eval_sharded_over_processes_covers_every_example_once(monkeypatch):
  config = _plain_digits_config(eval_batch_size=100)  # 50 per process: 180 -> 4 batches each
  test_x, _ = data_sources.digits_arrays(32)['test']
  per_process = []
  for index in range(2):
    _single_process(monkeypatch, index, 2)
    batches = list(input_pipeline.eval_iterator(config, mean=None))
    assert len(batches) == input_pipeline.num_eval_batches_of(
        input_pipeline.get_dataset_info(config).num_eval, config) == 4
    assert all(len(b['mask']) == 50 for b in batches)
    per_process.append(np.concatenate([b['image'][b['mask']] for b in batches]))
  seen = collections.Counter(_keys(np.concatenate(per_process)))
  assert seen == collections.Counter(_keys(test_x))


def test_process_shares_make_up_the_single_process_global_batch(monkeypatch):
  config = _digits_config()
  global_batches = _take(input_pipeline.train_iterator(config, mean=None), 2)
  shares = []
  for index in range(2):
    _single_process(monkeypatch, index, 2)
    shares.append(_take(input_pipeline.train_iterator(config, mean=None), 2))
  for step in range(2):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shares[0][step][key], shares[1][step][key]]),
          global_batches[step][key])


def test_mean_image_is_subtracted_before_the_crop(tmp_path):
  config = _plain_digits_config(mean='image', image_size=28, eval_batch_size=360)
  stats = data_stats.training_stats(config, str(tmp_path))
  test_x, _ = data_sources.digits_arrays(32)['test']
  train_x, _ = data_sources.digits_arrays(32)['train']
  np.testing.assert_allclose(stats['mean_image'], train_x.mean(axis=0), atol=1e-3)
  mean = data_stats.mean_to_subtract(config, stats)
  batch = next(input_pipeline.eval_iterator(config, mean=mean))
  expected = (test_x - stats['mean_image'])[:, 2:30, 2:30]
  np.testing.assert_allclose(batch['image'], expected, atol=1e-3)


def test_ten_crop_eval_is_the_ten_patches_of_the_mean_subtracted_square(tmp_path):
  config = _plain_digits_config(mean='channel', image_size=28, eval_batch_size=8)
  stats = data_stats.training_stats(config, str(tmp_path))
  mean = data_stats.mean_to_subtract(config, stats)
  batch = next(input_pipeline.eval_iterator(config, ten_crop=True, mean=mean))
  assert batch['image'].shape == (8, 10, 28, 28, 3)
  square = data_sources.digits_arrays(32)['test'][0][0] - stats['rgb_mean']
  five = [square[:28, :28], square[:28, 4:], square[4:, :28], square[4:, 4:], square[2:30, 2:30]]
  expected = np.stack(five + [patch[:, ::-1] for patch in five])
  np.testing.assert_allclose(batch['image'][0], expected, atol=1e-3)
  centre = next(input_pipeline.eval_iterator(config, mean=mean))['image']
  np.testing.assert_array_equal(centre, batch['image'][:, augment.TEN_CROP_ORDER.index('centre')])


def test_num_classes_too_small_is_an_error():
  with pytest.raises(data_sources.DataError, match='num_classes=10'):
    input_pipeline.get_dataset_info(_digits_config(num_classes=5))
