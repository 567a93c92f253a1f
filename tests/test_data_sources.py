"""Sources: decoding to §2's square, the digits split, image folders, TFDS (mocked, no network)."""

import io
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.data import sources as data_sources
from alexnet_jax.data import pipeline as input_pipeline
from alexnet_jax.bench import pipeline as pipeline_benchmark
from configs import alexnet
from configs import digits


def _encode(image, fmt, **options):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **options)
  return buffer.getvalue()


def test_center_square_of_a_png_is_the_numpy_slice():
  # Resizing the 30-pixel square to 30 changes nothing: the result is the central square.
  image = np.random.RandomState(0).randint(0, 256, [30, 50, 3]).astype(np.uint8)
  square = data_sources.decode_center_square(tf.constant(_encode(image, 'PNG')), 30).numpy()
  np.testing.assert_allclose(square, image[:, 10:40], atol=1e-3)
  tall = np.transpose(image, [1, 0, 2])  # 50 x 30: the central rows.
  square = data_sources.decode_center_square(tf.constant(_encode(tall, 'PNG')), 30).numpy()
  np.testing.assert_allclose(square, tall[10:40], atol=1e-3)


@pytest.mark.parametrize('subsampling', [0, 2])  # 4:4:4, and 4:2:0 as most photographs
def test_fused_jpeg_crop_equals_full_decode_then_slice(subsampling):
  image = pipeline_benchmark.natural_image(np.random.default_rng(0), 96, 64)
  encoded = _encode(image, 'JPEG', quality=95, subsampling=subsampling)
  full = tf.io.decode_jpeg(encoded, channels=3).numpy().astype(np.float32)
  square = data_sources.decode_center_square(tf.constant(encoded), 64).numpy()
  difference = np.abs(square - full[:, 16:80])
  if subsampling == 0:
    assert difference.max() <= 1.0
  else:  # half-resolution chroma is interpolated differently at the window's edges only
    assert difference[:, 2:-2].max() <= 1.0 and difference.mean() < 0.5


def test_grey_png_becomes_rgb():
  grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
  square = data_sources.decode_center_square(tf.constant(_encode(grey, 'PNG')), 8).numpy()
  np.testing.assert_allclose(square, np.repeat(grey[..., None], 3, -1), atol=1e-3)


def test_digits_are_scikit_learns_in_the_split_it_draws():
  """The digits read without importing scikit-learn are `load_digits`' own, and the stored split
  is the one train_test_split draws with the settings its file records."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  pixels, labels = data_sources.digits_pixels()
  assert pixels.dtype == digits.images.dtype and labels.dtype == digits.target.dtype
  np.testing.assert_array_equal(pixels, digits.images)
  np.testing.assert_array_equal(labels, digits.target)
  with open(data_sources.DIGITS_SPLIT_FILE, encoding='utf-8') as f:
    settings = json.load(f)
  assert settings['test_size'] == 360 and len(settings['train']) == 1437
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=settings['test_size'], stratify=labels,
      random_state=settings['seed'])
  arrays = data_sources.digits_arrays(8)  # (8 -> 8: the pixels as they are, scaled to 0..255)
  for name, index in (('train', train), ('test', test)):
    images, split_labels = arrays[name]
    np.testing.assert_array_equal(split_labels, digits.target[index])
    np.testing.assert_array_equal(
        images[..., 0], np.round(digits.images[index] * 255 / 16).astype(np.uint8))


def test_digits_split_is_fixed_stratified_and_upscaled_by_pixel_replication():
  target = data_sources.digits_pixels()[1]
  arrays = data_sources.digits_arrays(32)
  (train_x, train_y), (test_x, test_y) = arrays['train'], arrays['test']
  assert train_x.shape == (1437, 32, 32, 3) and test_x.shape == (360, 32, 32, 3)
  assert train_x.dtype == np.uint8 and train_x.max() == 255
  # Stratified: each class's share of the test split is its share of the data, +-1 image.
  for label in range(10):
    assert abs((test_y == label).sum() - 360 * (target == label).mean()) <= 1
  np.testing.assert_array_equal(np.bincount(train_y) + np.bincount(test_y), np.bincount(target))
  # Nearest-neighbour 8 -> 32 is pixel replication: every 4x4 block is one grey value.
  blocks = train_x[..., 0].reshape(-1, 8, 4, 8, 4)
  np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape))
  np.testing.assert_array_equal(train_x[..., 0], train_x[..., 2])
  info = input_pipeline.get_dataset_info(digits.get_config())
  assert (info.num_train, info.num_eval, info.num_classes) == (1437, 360, 10)
  assert info.class_names == tuple('0123456789')


def _folder_config(root, **overrides):
  config = alexnet.get_config()
  config.update({'dataset': 'folder', 'data_dir': str(root), 'eval_split': 'val',
                 'num_classes': 3, 'resize_size': 16, 'image_size': 12, 'batch_size': 4,
                 'eval_batch_size': 4, 'mean': None, **overrides})
  return config


def test_folder_counts_files_and_sorts_classes(tmp_path):
  pipeline_benchmark.write_jpegs(str(tmp_path), 9, num_classes=3, long_side=20)
  pipeline_benchmark.write_jpegs(str(tmp_path), 5, split='val', num_classes=3, long_side=20)
  os.rename(tmp_path / 'train/class_00/img_00000.jpg', tmp_path / 'train/class_00/UPPER.JPEG')
  (tmp_path / 'train/class_00/notes.txt').write_text('not an image')
  info = input_pipeline.get_dataset_info(_folder_config(tmp_path))
  assert info.class_names == ('class_00', 'class_01', 'class_02')
  assert (info.num_train, info.num_eval) == (9, 5)


def test_folder_without_usable_images_is_an_error_naming_it(tmp_path):
  (tmp_path / 'train/a').mkdir(parents=True)
  (tmp_path / 'val/a').mkdir(parents=True)
  with pytest.raises(data_sources.DataError, match=str(tmp_path / 'train')):
    input_pipeline.get_dataset_info(_folder_config(tmp_path))
  (tmp_path / 'train/a/broken.jpg').write_bytes(b'\xff\xd8\xff garbage')
  (tmp_path / 'val/a/broken.png').write_bytes(b'garbage')
  config = _folder_config(tmp_path, batch_size=1)
  with pytest.raises(data_sources.DataError, match='no usable images'):
    next(input_pipeline.train_iterator(config, mean=None))
  with pytest.raises(data_sources.DataError, match=str(tmp_path / 'val')):
    next(input_pipeline.eval_iterator(config, mean=None))


def test_missing_folder_is_an_error_naming_the_path(tmp_path):
  with pytest.raises(data_sources.DataError, match=str(tmp_path / 'nowhere')):
    input_pipeline.get_dataset_info(_folder_config(tmp_path / 'nowhere'))


def test_imagenet_without_tar_files_names_them_and_the_directory(tmp_path):
  config = alexnet.get_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(data_sources.DataError) as error:
    input_pipeline.get_dataset_info(config)
  message = str(error.value)
  for expected in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
                   os.path.join(str(tmp_path), 'downloads', 'manual'), '--config.data_dir'):
    assert expected in message


def _tfds_config(name, data_dir, **overrides):
  config = alexnet.get_config()
  config.update({'dataset': name, 'data_dir': str(data_dir), 'resize_size': 16,
                 'image_size': 12, 'batch_size': 4, 'eval_batch_size': 6, 'mean': 'channel',
                 'shuffle_buffer': 8, **overrides})
  return config


@pytest.mark.parametrize('cache', [False, True])
def test_tfds_imagenet_jpegs_through_the_mock(tmp_path, cache):
  # The JPEG (decode_and_crop_jpeg) path; the tar files only need to exist.
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  for name in data_sources.IMAGENET_MANUAL_FILES:
    (manual / name).write_bytes(b'')
  config = _tfds_config('imagenet2012', tmp_path, cache=cache)
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    info = input_pipeline.get_dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 10, 10)
    train = next(input_pipeline.train_iterator(config, mean=None))
    batches = list(input_pipeline.eval_iterator(config, ten_crop=True, mean=None))
  assert train['image'].shape == (4, 12, 12, 3) and train['image'].dtype == np.float32
  assert train['label'].dtype == np.int32 and np.all(train['label'] < 1000)
  assert [b['image'].shape for b in batches] == [(6, 10, 12, 12, 3)] * 2
  assert sum(b['mask'].sum() for b in batches) == 10


def test_tfds_grey_pngs_become_rgb(tmp_path):
  config = _tfds_config('mnist', tmp_path, num_classes=10, mean=None, pca_lighting=False)
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(input_pipeline.train_iterator(config, mean=None))
  assert batch['image'].shape == (4, 12, 12, 3)
  assert np.all(batch['image'][..., 0] == batch['image'][..., 1])  # grey replicated


def test_synthetic_shapes():
  config = alexnet.get_config()
  config.update(dataset='synthetic', image_size=8, batch_size=4, eval_batch_size=4)
  info = input_pipeline.get_dataset_info(config)
  assert info.num_train == data_sources.SYNTHETIC_NUM_TRAIN
  batch = next(input_pipeline.train_iterator(config, mean=None))
  assert batch['image'].shape == (4, 8, 8, 3) and batch['label'].dtype == np.int32
  masks = [b['mask'] for b in input_pipeline.eval_iterator(config, mean=None)]
  assert len(masks) == input_pipeline.num_eval_batches_of(info.num_eval, config)
  assert sum(m.sum() for m in masks) == info.num_eval
