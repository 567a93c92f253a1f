"""alexnet_jax/weights/export.py: a SavedModel that TensorFlow alone serves as predict predicts."""

import json
import os
import sys

from absl import logging as absl_logging
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import errors
from alexnet_jax.paper import predict
from alexnet_jax.weights import export

import conftest

SIZES = ((23, 31), (40, 28))  # (height, width): not square, one wider and one taller

# Run in a fresh process with TensorFlow alone: what a server without JAX or this package does.
_SERVE = r'''
import json, sys
sys.modules['keras.src.optimizers'] = None  # TensorFlow without Keras: seconds off its import
import tensorflow as tf
saved_models, paths = json.loads(sys.argv[1])
report = {}
for saved in saved_models:
  loaded = tf.saved_model.load(saved)
  serve = loaded.signatures['serving_default']
  rows = []
  for path in paths:
    image = tf.io.decode_png(tf.io.read_file(path), channels=3)
    out = serve(images=image[tf.newaxis])  # a batch of one
    rows.append({'classes': [c.decode() for c in out['classes'][0].numpy()],
                 'probabilities': out['probabilities'][0].numpy().tolist(),
                 'labels': out['labels'][0].numpy().tolist()})
  one = loaded.signatures['single_image'](image=image)
  report[saved] = {'rows': rows, 'step': int(loaded.step.numpy()),
                   'single_image': one['probabilities'].numpy().tolist()}
report['ours'] = sorted(m for m in sys.modules if m.split('.')[0] == 'alexnet_jax')
print(json.dumps(report))
'''


def _write_images(directory):
  rng = np.random.default_rng(0)
  paths = []
  for height, width in SIZES:
    path = os.path.join(directory, f'random_{height}x{width}.png')
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


@pytest.mark.slow
def test_tensorflow_alone_serves_what_predict_predicts(tiny_workdir, tmp_path):
  paths = _write_images(tmp_path)
  level = absl_logging.get_absl_logger().level
  centre = export.export_saved_model(tiny_workdir, str(tmp_path / 'centre'))
  # TensorFlow's saving sets absl's logger to WARNING; the export puts it back (a caller's, and
  # later tests', INFO lines must not vanish).
  assert absl_logging.get_absl_logger().level == level
  (tmp_path / 'ten').mkdir()  # an empty folder is taken
  ten = export.export_saved_model(tiny_workdir, str(tmp_path / 'ten'), ten_crop=True)
  assert sorted(os.listdir(tmp_path)) == sorted(['centre', 'ten'] + [os.path.basename(p)
                                                                     for p in paths])
  proc = conftest.run([sys.executable, '-c', _SERVE, json.dumps([[centre, ten], paths])],
                      cwd=tmp_path, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['ours'] == []  # (TensorFlow imports JAX itself where it is installed)
  for saved, ten_crop in ((centre, False), (ten, True)):
    expected = predict.predict_files(tiny_workdir, paths, ten_crop=ten_crop)
    served = report[saved]
    for got, want in zip(served['rows'], expected):
      assert got['classes'] == want['classes'] and got['labels'] == want['labels'], saved
      np.testing.assert_allclose(got['probabilities'], want['probabilities'], atol=1e-5)
    np.testing.assert_allclose(served['single_image'], expected[-1]['probabilities'], atol=1e-5)
    assert served['step'] == 4


def test_a_failed_export_leaves_nothing(tiny_workdir, tmp_path, monkeypatch):
  def fails_halfway(module, directory, signatures):
    del module, signatures
    os.makedirs(directory)
    open(os.path.join(directory, 'saved_model.pb'), 'wb').close()
    raise OSError('disk full')

  monkeypatch.setattr(export.tf.saved_model, 'save', fails_halfway)
  with pytest.raises(OSError, match='disk full'):
    export.export_saved_model(tiny_workdir, str(tmp_path / 'out'), platforms=['cpu'])
  assert os.listdir(tmp_path) == []


def test_user_errors_before_any_work(tiny_workdir, tmp_path):
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'keep.txt').write_text('mine')
  with pytest.raises(errors.UserError, match='--output=.*taken exists and is not an empty'):
    export.export_saved_model(tiny_workdir, str(taken))
  assert os.listdir(taken) == ['keep.txt']
  with pytest.raises(errors.RunError, match='no_run is not a directory'):
    export.export_saved_model(str(tmp_path / 'no_run'), str(tmp_path / 'out'))
  with pytest.raises(errors.UserError, match=r"--platforms=cpu,gpu: unknown \['gpu'\]"):
    export.export_saved_model(tiny_workdir, str(tmp_path / 'out'), platforms=['cpu', 'gpu'])
  assert sorted(os.listdir(tmp_path)) == ['taken']
