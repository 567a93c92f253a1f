"""The one-pass preparation (data/prepare.py), reading it (dataset='prepared'), and the device's
finishing of uint8 patches (data/on_device.py) against the host's float pipeline."""

import collections
import io
import json
import os
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet_jax.data import on_device
from alexnet_jax.data import pipeline as input_pipeline
from alexnet_jax.data import prepare
from alexnet_jax.data import sources
from alexnet_jax.data import stats as data_stats

import conftest

SIZE = 24  # resize_size of these tests (the paper's 256, scaled down)
CROP = 20


def _photo(rng, width, height):
  """Smooth colour content with correlated channels, so that JPEG and the PCA behave as on
  photographs."""
  low = rng.uniform(0, 255, [4, 4, 3]).astype(np.uint8)
  image = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
  return np.clip(image + rng.normal(0, 1, image.shape), 0, 255).astype(np.uint8)


def _save(path, image, kind='jpeg'):
  buffer = io.BytesIO()
  if kind == 'cmyk':
    Image.fromarray(image).convert('CMYK').save(buffer, 'JPEG', quality=95)
  elif kind == 'grey':
    Image.fromarray(image).convert('L').save(buffer, 'JPEG', quality=95)
  elif kind == 'png':  # a PNG with ImageNet's .JPEG name
    Image.fromarray(image).save(buffer, 'PNG')
  else:
    Image.fromarray(image).save(buffer, 'JPEG', quality=95)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def _folder(root, num_train=30, num_val=7, seed=0):
  """ROOT/{train,validation}/c<k>/ with ImageNet's odd files among ordinary JPEGs; returns
  {path: original RGB} of the decodable files and the unreadable paths."""
  rng = np.random.default_rng(seed)
  kinds = {0: 'cmyk', 1: 'grey', 2: 'png'}
  originals, broken = {}, []
  for split, n in (('train', num_train), ('validation', num_val)):
    for i in range(n):
      image = _photo(rng, int(rng.integers(SIZE, 2 * SIZE)), int(rng.integers(SIZE, 2 * SIZE)))
      path = root / split / f'c{i % 3}' / f'img_{i:03d}.JPEG'
      kind = kinds.get(i, 'jpeg') if split == 'train' else 'jpeg'
      _save(path, image, kind)
      originals[str(path)] = image
    bad = root / split / 'c1' / 'broken.JPEG'
    bad.write_bytes(b'\xff\xd8 not really a jpeg')
    broken.append(str(bad))
  return originals, broken


def _settings(root, **overrides):
  fields = dict(source='folder', data_dir=str(root), splits=('train', 'validation'),
                train_split='train', resize_size=SIZE, antialias=True, quality=100,
                shard_size=7)
  fields.update(overrides)
  return prepare.Settings(**fields)


def _squares(paths):
  """The uint8 squares the pipeline makes of `paths`, independently of the preparation."""
  return {p: np.asarray(tf.cast(tf.round(sources.decode_center_square(
      tf.io.read_file(p), SIZE)), tf.uint8)) for p in paths}


def _records(directory, split):
  index = json.loads((directory / 'index.json').read_text())
  out = []
  for shard in index['splits'][split]['shards']:
    for raw in tf.data.TFRecordDataset(str(directory / shard['file'])).as_numpy_iterator():
      ex = sources.parse_prepared(tf.constant(raw))
      out.append((tf.io.decode_jpeg(ex['encoded']).numpy(), int(ex['label'])))
  return index, out


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  originals, broken = _folder(root)
  out = tmp_path_factory.mktemp('prepared')
  prepare.prepare(_settings(root), str(out), workers=1)
  return root, out, originals, broken


def _config(data_dir, **overrides):
  """configs/alexnet.py reading the preparation in `data_dir`, at this file's sizes."""
  return conftest.config('alexnet', **{
      'dataset': 'prepared', 'data_dir': str(data_dir), 'num_classes': 3, 'resize_size': SIZE,
      'image_size': CROP, 'batch_size': 4, 'eval_batch_size': 4, 'shuffle_buffer': 10,
      **overrides})


def test_preparation_holds_every_readable_image_and_exact_statistics(prepared):
  root, out, originals, broken = prepared
  index, records = _records(out, 'train')
  train = {p: im for p, im in originals.items() if '/train/' in p}
  assert index['class_names'] == ['c0', 'c1', 'c2']
  info = index['splits']['train']
  assert info['num_examples'] == len(records) == len(train) == 30
  assert [u['source'] for u in info['unreadable']] == [broken[0]]
  assert info['unreadable'][0]['error'].startswith('Unknown image file format')
  assert info['num_unreadable'] == 1 and index['splits']['validation']['num_unreadable'] == 1
  assert len(info['shards']) == 5 and sum(s['num_examples'] for s in info['shards']) == 30
  assert index['splits']['validation']['num_examples'] == 7
  assert not (out / '.progress').exists()
  # Each record is the pipeline's square of one source image, with its folder's label; shuffled,
  # so each record is matched to its nearest square. Quality 100 still halves the colour
  # resolution (4:2:0), which on these 24-pixel squares of saturated colours costs about 4
  # levels; any other image is more than 40 levels away.
  squares = _squares(train)
  labels = {p: int(p.split('/')[-2][1:]) for p in train}
  matched = set()
  for image, label in records:
    assert image.shape == (SIZE, SIZE, 3)
    errors = {p: np.abs(image.astype(float) - s).mean() for p, s in squares.items()}
    best = min(errors, key=errors.get)
    assert errors[best] < 8 and labels[best] == label
    matched.add(best)
  assert matched == set(train)  # every image once
  # ImageNet's oddities decoded as the images they are: CMYK as Pillow converts it to RGB (an
  # independent decoder), greyscale with three equal channels, a PNG named .JPEG.
  cmyk, grey, png = (root / 'train' / f'c{i}' / f'img_{i:03d}.JPEG' for i in range(3))
  buffer = io.BytesIO()
  Image.open(cmyk).convert('RGB').save(buffer, 'PNG')
  by_pillow = sources.decode_center_square(tf.constant(buffer.getvalue()), SIZE).numpy()
  assert np.abs(squares[str(cmyk)] - by_pillow).mean() < 2
  assert np.all(squares[str(grey)][..., 0] == squares[str(grey)][..., 2])
  assert squares[str(png)].std() > 5
  # The statistics: NumPy over the same squares (exact sums of integers).
  stack = np.stack(list(squares.values())).astype(np.float64)
  stats = data_stats.load_stats(str(out / 'stats.npz'))
  np.testing.assert_allclose(stats['mean_image'], stack.mean(axis=0), rtol=1e-6)
  covariance = np.cov(stack.reshape(-1, 3).T / 255.0, bias=True)
  np.testing.assert_allclose(stats['eigvec'] @ np.diag(stats['eigval']) @ stats['eigvec'].T,
                             covariance, atol=1e-7)
  assert int(stats['num_images']) == 30


def test_an_interrupted_preparation_resumes_without_redoing_shards(prepared, tmp_path,
                                                                   monkeypatch):
  root, whole, _, _ = prepared
  real = prepare.prepare_shards
  calls = []

  def interrupted(settings, shards, output, parallel, done):
    def done_then_stop(shard, result):  # stopped after the third shard is recorded
      if len(calls) == 3:
        raise KeyboardInterrupt
      calls.append(shard.key)
      done(shard, result)
    return real(settings, shards, output, parallel, done_then_stop)

  def counted(settings, shards, output, parallel, done):
    return real(settings, shards, output, parallel,
                lambda shard, result: (calls.append(shard.key), done(shard, result)))

  monkeypatch.setattr(prepare, 'prepare_shards', interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(_settings(root), str(tmp_path), workers=1)
  assert not (tmp_path / 'index.json').exists()
  done, calls[:] = list(calls), []
  monkeypatch.setattr(prepare, 'prepare_shards', counted)
  prepare.prepare(_settings(root), str(tmp_path), workers=1)
  assert not set(done) & set(calls) and len(done) + len(calls) == 5 + 2
  for name in json.loads((whole / 'index.json').read_text())['splits']['train']['shards']:
    assert (tmp_path / name['file']).read_bytes() == (whole / name['file']).read_bytes()
  a, b = (data_stats.load_stats(str(d / 'stats.npz')) for d in (whole, tmp_path))
  for key in ('mean_image', 'eigval', 'eigvec', 'num_images'):
    np.testing.assert_array_equal(a[key], b[key])
  # Other settings over an unfinished or finished preparation: refused, nothing touched.
  with pytest.raises(prepare.UserError, match='other settings'):
    prepare.prepare(_settings(root, quality=50), str(tmp_path), workers=1)


@pytest.mark.slow
def test_the_command_works_in_parallel_and_reports_progress(prepared, tmp_path):
  root = prepared[0]
  env = dict(os.environ, PYTHONPATH=conftest.ROOT)
  cmd = [sys.executable, '-m', 'alexnet_jax.data.prepare', '--source=folder',
         f'--data_dir={root}', f'--output={tmp_path / "out"}', f'--resize_size={SIZE}',
         '--quality=100', '--shard_size=7', '--workers=2']
  proc = conftest.run(cmd, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ETA' in proc.stderr and '7/7 shards' in proc.stderr
  assert 'train: 30 images (1 unreadable)' in proc.stdout
  for shard in json.loads((prepared[1] / 'index.json').read_text())['splits']['train']['shards']:
    assert ((tmp_path / 'out' / shard['file']).read_bytes()
            == (prepared[1] / shard['file']).read_bytes())
  for bad in ('--quality=0', '--source=nonexistent_ds'):  # each a one-line error, exit 2
    proc = conftest.run(cmd + [bad], env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith('Error:'), (
        bad, proc.stderr[-2000:])


def _take(iterator, n):
  out = [next(iterator) for _ in range(n)]
  iterator.close()
  return out


def test_prepared_training_order_is_exact_on_resume_and_covers_each_epoch_once(prepared):
  out = prepared[1]
  config = _config(out, random_crop=False, random_flip=False, pca_lighting=False, mean='none')
  steps = 30 // 4  # 7 per epoch; 2 examples left over, different ones each epoch
  uninterrupted = _take(input_pipeline.train_iterator(config, mean=None), 2 * steps + 2)
  for start in (1, 3, steps, steps + 4):
    resumed = _take(input_pipeline.train_iterator(config, start_step=start, mean=None), 3)
    for a, b in zip(uninterrupted[start:start + 3], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  _, records = _records(out, 'train')
  centre = collections.Counter(im[2:2 + CROP, 2:2 + CROP].tobytes() for im, _ in records)
  for epoch in range(2):
    seen = collections.Counter(
        x.astype(np.uint8).tobytes() for b in uninterrupted[epoch * steps:(epoch + 1) * steps]
        for x in b['image'])
    assert sum(seen.values()) == 28 and not seen - centre  # 28 distinct images of the 30
    assert max(seen.values()) == 1
  assert [b['image'].tobytes() for b in uninterrupted[:steps]] != [
      b['image'].tobytes() for b in uninterrupted[steps:2 * steps]]  # a new order each epoch


def test_each_process_reads_its_own_slice(prepared, monkeypatch):
  out = prepared[1]
  config = _config(out, random_crop=False, random_flip=False, pca_lighting=False, mean='none')
  images = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda i=index: i)
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    batches = _take(input_pipeline.train_iterator(config, mean=None), 7)
    assert all(len(b['label']) == 2 for b in batches)
    images.append({x.tobytes() for b in batches for x in b['image']})
  assert len(images[0]) == len(images[1]) == 14 and not images[0] & images[1]
  evaluated = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda i=index: i)
    batches = list(input_pipeline.eval_iterator(config, mean=None))
    evaluated.append(sum(int(b['mask'].sum()) for b in batches))
  assert evaluated == [3, 4]


@pytest.mark.parametrize('dataset', ['prepared', 'digits'])
def test_device_finishing_equals_the_host_pipeline(prepared, dataset):
  if dataset == 'prepared':
    config = _config(prepared[1], pca_lighting_scale='cuda_convnet')
    mean = data_stats.mean_to_subtract(
        config, data_stats.load_stats(sources.prepared_stats_path(config)))
    assert mean.shape == (SIZE, SIZE, 3)
  else:  # the quick start's per-channel mean, on squares that are uint8 values already
    from configs import digits  # pylint: disable=g-import-not-at-top
    config = digits.get_config()
    config.update(batch_size=8, pca_lighting=True, random_flip=True)
    mean = np.array([30.0, 20.0, 10.0], np.float32).reshape(1, 1, 3)
  finish = jax.jit(on_device.finisher(config, mean))
  host = _take(input_pipeline.train_iterator(config, start_step=2, mean=mean), 3)
  device = _take(input_pipeline.train_iterator(config, start_step=2, mean=mean, on_device=True),
                 3)
  flips = 0
  for h, d in zip(host, device):
    assert d['image'].dtype == np.uint8 and d['image'].nbytes == h['image'].nbytes // 4
    flips += int(d['crop'][:, 2].sum())
    finished = finish(d)
    assert set(finished) == {'image', 'label'}
    np.testing.assert_allclose(finished['image'], h['image'], rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(finished['label'], h['label'])
  assert 0 < flips < 3 * config.batch_size
  for ten_crop in (False, True):
    h = next(input_pipeline.eval_iterator(config, ten_crop=ten_crop, mean=mean))
    d = next(input_pipeline.eval_iterator(config, ten_crop=ten_crop, mean=mean, on_device=True))
    assert d['image'].dtype == np.uint8
    np.testing.assert_allclose(finish(d)['image'], h['image'], rtol=1e-6, atol=1e-4)


def test_a_run_trains_and_evaluates_on_prepared_data(prepared, tmp_path):
  out = prepared[1]
  workdir = conftest.train_tiny(tmp_path, dataset='prepared', data_dir=str(out), num_classes=3,
                                resize_size=SIZE, image_size=CROP, batch_size=8,
                                eval_batch_size=8, eval_split='validation', mean='image',
                                num_train_steps=3, eval_every_steps=3, cache=False)
  # The run keeps its own copy of the preparation's statistics.
  assert (data_stats.load_stats(os.path.join(workdir, 'data_stats.npz'))['mean_image'] ==
          data_stats.load_stats(str(out / 'stats.npz'))['mean_image']).all()
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['eval/num_examples'] for l in lines if 'eval/num_examples' in l] == [7]


def test_a_missing_or_unfinished_preparation_is_one_clear_error(tmp_path):
  (tmp_path / '.progress').mkdir()
  with pytest.raises(sources.DataError, match='unfinished'):
    input_pipeline.get_dataset_info(_config(tmp_path))
