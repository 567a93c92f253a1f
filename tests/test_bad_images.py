"""Bad files in an image folder (issue 15): each decodes as the image it is, or is skipped,
counted and named with its reason, in training, evaluation, statistics and predict alike.

One folder holds every case. The valid oddities are held to an independent decoder (Pillow, or
NumPy for 16-bit samples); batches, statistics and predictions to those images; the logs and the
predict records must name exactly the bad files, each with its reason.
"""

import collections
import io
import json
import logging
import os
import shutil
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from alexnet_jax.data import pipeline
from alexnet_jax.data import sources
from alexnet_jax.data import stats as data_stats
from alexnet_jax.paper import predict

import conftest

SIZE = 24  # the small images' side and config.resize_size: their squares are the images.
BIG = 12000  # the very large image's side
FLAT = (200, 100, 50)  # its one colour: written and decoded in seconds
CLASSES = ('a_odd', 'b_empty', 'c_mixed')
# What TensorFlow says about each bad file (a substring of the logged reason).
BAD = {'c_mixed/empty.jpg': 'Input is empty',
       'c_mixed/truncated.jpg': 'Invalid JPEG data',
       'c_mixed/not_image.png': 'Unknown image file format'}
LOCKED = 'c_mixed/locked.jpg'  # a valid JPEG, mode 000: unreadable unless the reader is root
PERMISSION = 'Permission denied'
# libjpeg's fast integer IDCT (TensorFlow's default) against the accurate one (Pillow's): on flat
# 8x8 blocks they differ by at most one level (on textured images by up to 8, measured).
JPEG_LEVELS = 1


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _pillow_rgb(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), np.float64)


def _blocks(rng, channels: int) -> np.ndarray:
  """SIZE x SIZE of flat 8x8 blocks (see JPEG_LEVELS)."""
  values = rng.integers(0, 256, [SIZE // 8, SIZE // 8, channels], dtype=np.uint8)
  return np.kron(values, np.ones([8, 8, 1], np.uint8))


def _write_folder(root):
  """The folder root/train/<class>/, every case in it: {relative path: (reference RGB image,
  tolerance in levels)} of the valid files."""
  rng = np.random.default_rng(0)
  valid, files = {}, {}
  cmyk = _encode(Image.fromarray(_blocks(rng, 4), 'CMYK'), 'JPEG', quality=95)
  files['a_odd/cmyk.jpg'] = cmyk
  valid['a_odd/cmyk.jpg'] = (_pillow_rgb(cmyk), JPEG_LEVELS)
  grey = _encode(Image.fromarray(_blocks(rng, 1)[..., 0], 'L'), 'JPEG', quality=95)
  files['a_odd/grey.jpg'] = grey
  valid['a_odd/grey.jpg'] = (_pillow_rgb(grey), JPEG_LEVELS)
  rgba = rng.integers(0, 256, [SIZE, SIZE, 4], dtype=np.uint8)
  files['a_odd/alpha.png'] = _encode(Image.fromarray(rgba, 'RGBA'), 'PNG')
  valid['a_odd/alpha.png'] = (_pillow_rgb(files['a_odd/alpha.png']), 0)  # alpha dropped
  np.testing.assert_array_equal(valid['a_odd/alpha.png'][0], rgba[..., :3])
  # 16-bit samples: 8-bit is the high byte, v >> 8 (NumPy; Pillow's convert('RGB') of a 16-bit
  # grey image clips instead of scaling, so it is no reference for that one).
  grey16 = rng.integers(0, 65536, [SIZE, SIZE], dtype=np.uint16)
  files['a_odd/grey16.png'] = _encode(Image.fromarray(grey16), 'PNG')
  assert Image.open(io.BytesIO(files['a_odd/grey16.png'])).mode == 'I;16'
  valid['a_odd/grey16.png'] = (np.repeat(grey16[..., None] >> 8, 3, axis=-1).astype(float), 0)
  rgb16 = rng.integers(0, 65536, [SIZE, SIZE, 3], dtype=np.uint16)
  files['a_odd/rgb16.png'] = tf.io.encode_png(rgb16).numpy()  # Pillow writes no 48-bit PNG
  valid['a_odd/rgb16.png'] = (_pillow_rgb(files['a_odd/rgb16.png']), 0)
  np.testing.assert_array_equal(valid['a_odd/rgb16.png'][0], rgb16 >> 8)
  png = rng.integers(0, 256, [SIZE, SIZE, 3], dtype=np.uint8)
  files['a_odd/png_named.JPEG'] = _encode(Image.fromarray(png), 'PNG')
  valid['a_odd/png_named.JPEG'] = (png.astype(float), 0)
  files['c_mixed/big.jpg'] = _encode(Image.new('RGB', (BIG, BIG), FLAT), 'JPEG', quality=90)
  small_flat = _encode(Image.new('RGB', (SIZE, SIZE), FLAT), 'JPEG', quality=90)
  # Resizing a flat image leaves it flat, up to float round-off.
  valid['c_mixed/big.jpg'] = (_pillow_rgb(small_flat), JPEG_LEVELS + 1e-3)
  files['c_mixed/empty.jpg'] = b''
  whole = _encode(Image.fromarray(png), 'JPEG', quality=95)
  files['c_mixed/truncated.jpg'] = whole[:len(whole) // 2]
  files['c_mixed/not_image.png'] = b'Not an image, whatever its name says.\n'
  files[LOCKED] = _encode(Image.fromarray(_blocks(rng, 3)), 'JPEG', quality=95, subsampling=0)
  valid[LOCKED] = (_pillow_rgb(files[LOCKED]), JPEG_LEVELS)
  for i in range(5):
    plain = rng.integers(0, 256, [SIZE, SIZE, 3], dtype=np.uint8)
    files[f'c_mixed/plain_{i}.png'] = _encode(Image.fromarray(plain), 'PNG')
    valid[f'c_mixed/plain_{i}.png'] = (plain.astype(float), 0)
  for name in CLASSES:
    (root / 'train' / name).mkdir(parents=True)
  (root / 'train/b_empty/notes.txt').write_text('not an image extension: not listed')
  for name, data in files.items():
    (root / 'train' / name).write_bytes(data)
  os.chmod(root / 'train' / LOCKED, 0)
  return valid


def _overrides(root) -> dict:
  """configs/tiny.py on the folder; no augmentation, so a training image is its square."""
  return {'dataset': 'folder', 'data_dir': str(root), 'train_split': 'train',
          'eval_split': 'train', 'num_classes': len(CLASSES), 'resize_size': SIZE,
          'image_size': SIZE, 'random_crop': False, 'random_flip': False, 'batch_size': 4,
          'eval_batch_size': 8}


def _readable(path) -> bool:
  try:
    with open(path, 'rb') as f:
      f.read(1)
    return True
  except PermissionError:
    return False


Folder = collections.namedtuple('Folder', 'root overrides config valid bad squares labels')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """The folder; its valid files' references and squares (decoded here by the pipeline's
  decoder); its bad files {path: reason}. The mode-000 file is valid where the reader is root."""
  root = tmp_path_factory.mktemp('bad_images')
  references = _write_folder(root)
  bad = {str(root / 'train' / k): v for k, v in BAD.items()}
  if not _readable(root / 'train' / LOCKED):
    bad[str(root / 'train' / LOCKED)] = PERMISSION
    del references[LOCKED]
  valid = {str(root / 'train' / k): v for k, v in references.items()}
  squares = {p: sources.decode_center_square(tf.io.read_file(p), SIZE).numpy() for p in valid}
  labels = {p: CLASSES.index(os.path.basename(os.path.dirname(p))) for p in valid}
  assert len(valid) + len(bad) == 16  # 4 batches of 4: one epoch has every file at a position
  config = conftest.tiny_config(**_overrides(root))
  return Folder(root, _overrides(root), config, valid, bad, squares, labels)


def _named(messages, folder) -> dict[str, str]:
  """{bad path: the message naming it}; fails if a message names a file twice or a valid one."""
  named = {}
  for message in messages:
    for path in folder.bad:
      if path in message:
        assert path not in named, f'{path} named twice'
        named[path] = message
    assert not any(p in message for p in folder.valid), message
  return named


def _assert_named_with_reasons(messages, folder):
  named = _named(messages, folder)
  assert set(named) == set(folder.bad)
  for path, reason in folder.bad.items():
    assert f'{path}: ' in named[path] and reason in named[path], named[path]


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _which(image, folder) -> str:
  """The valid file whose square `image` is, exactly."""
  found = [p for p, s in folder.squares.items() if np.array_equal(image, s)]
  assert len(found) == 1, f'an image matching {len(found)} files'
  return found[0]


def test_valid_files_decode_as_an_independent_decoder_reads_them(folder):
  for path, (reference, levels) in folder.valid.items():
    square = folder.squares[path]
    assert square.shape == (SIZE, SIZE, 3)
    assert np.abs(square - reference).max() <= levels, path


def test_bad_files_fail_to_decode_with_their_reason(folder):
  for path, reason in folder.bad.items():
    with pytest.raises(tf.errors.OpError) as error:
      sources.decode_center_square(tf.io.read_file(path), SIZE)
    assert reason in sources.unreadable_reason(error.value)


def test_empty_class_folder_stays_a_class_named_once(folder, caplog):
  sources.list_folder.cache_clear()  # pylint: disable=protected-access
  info = pipeline.get_dataset_info(folder.config)
  for _ in range(2):
    sources.open_split(folder.config, 'train')
  assert info.class_names == CLASSES and info.num_train == 16  # files, readable or not
  empty = [m for m in _warnings(caplog) if 'b_empty' in m]
  assert len(empty) == 1 and 'a_odd' not in empty[0] and 'c_mixed' not in empty[0]


def test_training_uses_every_readable_file_and_names_each_bad_one(folder, caplog):
  batches = pipeline.train_iterator(folder.config, mean=None)
  seen = set()
  for _ in range(16 // folder.config.batch_size):  # one epoch
    batch = next(batches)
    assert set(batch) == {'image', 'label'} and batch['image'].shape == (4, SIZE, SIZE, 3)
    for image, label in zip(batch['image'], batch['label']):
      path = _which(image, folder)
      assert label == folder.labels[path]
      seen.add(path)
  assert seen == set(folder.valid)  # a bad file's position took another valid one
  messages = [m for m in _warnings(caplog) if 'Unreadable image skipped' in m]
  _assert_named_with_reasons(messages, folder)
  assert sorted(int(m.split('(')[1].split(' ')[0]) for m in messages) == list(
      range(1, len(folder.bad) + 1))  # counted: '(k so far)'


def test_evaluation_sees_every_readable_file_once_and_names_the_rest(folder, caplog):
  batches = list(pipeline.eval_iterator(folder.config, mean=None))
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  paths = [_which(image, folder) for image in images]
  assert sorted(paths) == sorted(folder.valid)  # each once
  assert [folder.labels[p] for p in paths] == list(labels)
  assert 2 in labels  # c_mixed: the empty class before it shifted no label
  [message] = [m for m in _warnings(caplog) if 'left out' in m]
  assert f'left out {len(folder.bad)} unreadable images' in message
  _assert_named_with_reasons([message], folder)


def test_statistics_are_those_of_the_readable_files(folder, caplog):
  stats = data_stats.compute_stats(folder.config, num_images=0)
  squares = np.stack(list(folder.squares.values())).astype(np.float64)
  assert int(stats['num_images']) == len(folder.valid)
  np.testing.assert_allclose(stats['mean_image'], squares.mean(axis=0), atol=1e-3)
  rgb = squares.reshape(-1, 3)
  np.testing.assert_allclose(stats['rgb_mean'], rgb.mean(axis=0), atol=1e-3)
  covariance = np.cov(rgb.T / 255.0, bias=True)
  eigvec, eigval = stats['eigvec'], stats['eigval']
  np.testing.assert_allclose(eigvec @ np.diag(eigval) @ eigvec.T, covariance, atol=1e-6)
  [message] = [m for m in _warnings(caplog) if 'data_stats' in m]
  assert f'{len(folder.bad)} of 16 images were unreadable' in message
  _assert_named_with_reasons([message], folder)


def test_predict_skips_and_names_bad_files_and_predicts_the_others(folder, tiny_workdir,
                                                                   caplog):
  missing = str(folder.root / 'no_such.jpg')
  paths = sorted(folder.valid) + sorted(folder.bad) + [missing]
  paths = paths[::2] + paths[1::2]  # bad and valid files interleaved
  records = predict.predict_files(tiny_workdir, paths)
  assert [r['path'] for r in records] == paths
  skipped = {r['path']: r['error'] for r in records if 'error' in r}
  assert skipped.keys() == set(folder.bad) | {missing}
  assert skipped[missing] == 'no such file'
  for path, reason in folder.bad.items():
    assert reason in skipped[path] and path not in skipped[path]
  _assert_named_with_reasons([m for m in _warnings(caplog) if 'no_such.jpg' not in m], folder)
  # The readable files get what they get alone: skipping shifted no prediction onto another.
  alone = {r['path']: r for r in predict.predict_files(tiny_workdir, sorted(folder.valid))}
  for record in records:
    if 'error' not in record:
      assert record['labels'] == alone[record['path']]['labels'] and len(record['labels']) == 5
      np.testing.assert_allclose(record['probabilities'], alone[record['path']]['probabilities'],
                                 rtol=1e-5)
  text = predict.format_predictions(records)
  assert f'{missing}\n  skipped: no such file' in text
  assert text.endswith(f'Skipped {len(folder.bad) + 1} of {len(paths)} files that cannot be '
                       'read as images.')


# The four places over the folder, as a user who may not read the mode-000 file: the warnings of
# each (predict's error for that file), as JSON.
_LOCKED_OUT = r'''
import json, logging, sys
messages = []
class Keep(logging.Handler):
  def emit(self, record):
    messages.append(record.getMessage())
logging.getLogger().addHandler(Keep(logging.WARNING))
from alexnet_jax.data import pipeline, stats
from alexnet_jax.paper import predict
from configs import tiny
config = tiny.get_config()
config.update(json.loads(sys.argv[1]))
locked = sys.argv[2]
out = {}
train = pipeline.train_iterator(config, mean=None)
[next(train) for _ in range(16 // config.batch_size)]
out['train'], messages[:] = messages[:], []
list(pipeline.eval_iterator(config, mean=None))
out['eval'], messages[:] = messages[:], []
stats.compute_stats(config, 0)
out['stats'], messages[:] = messages[:], []
try:  # predict_files skips a file for the error read_square raises (restoring a run: 10 s)
  predict.read_square(locked, config)
except predict.ImageReadError as e:
  out['predict'] = [str(e)]
print(json.dumps(out))
'''


@pytest.mark.slow
def test_a_file_without_read_permission_is_named_as_such_everywhere(folder):
  locked = str(folder.root / 'train' / LOCKED)
  command = [sys.executable, '-c', _LOCKED_OUT, json.dumps(folder.overrides), locked]
  if os.geteuid() == 0:  # root reads any file: run without that power (util-linux's setpriv)
    if not shutil.which('setpriv'):
      pytest.skip('running as root, and no setpriv to drop the power to read any file')
    command = ['setpriv', '--bounding-set=-dac_override,-dac_read_search'] + command
  proc = conftest.run(command)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.splitlines()[-1])
  for place in ('train', 'eval', 'stats', 'predict'):
    assert any(f'{locked}: {PERMISSION}' in m for m in out[place]), (place, out[place])
