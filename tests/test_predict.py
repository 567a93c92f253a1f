"""alexnet_jax/paper/predict.py: image files get the evaluation's preprocessing and softmax."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import config as config_lib
from alexnet_jax.core import evaluation
from alexnet_jax.core import run as run_lib
from alexnet_jax.data import sources as data_sources
from alexnet_jax.paper import predict

import conftest

EXAMPLES = (0, 7, 359)  # indices into the digits test split


def _write_test_digits(config, directory):
  """PNG files of test digits at the run's square size: decoding them changes no pixel."""
  images, labels = data_sources.digits_arrays(config.resize_size)['test']
  paths = []
  for i in EXAMPLES:
    path = os.path.join(directory, f'digit{i}_label{labels[i]}.png')
    Image.fromarray(images[i]).save(path)
    paths.append(path)
  return paths


@pytest.mark.parametrize('ten_crop', [False, True])
def test_files_match_the_evaluation_softmax(tiny_workdir, tmp_path, ten_crop):
  run = run_lib.open_run(tiny_workdir)
  paths = _write_test_digits(run.config, tmp_path)
  preds = predict.predict_files(tiny_workdir, paths, ten_crop=ten_crop)
  # The independent path: the input pipeline's evaluation batches of the same test digits.
  restored = run.restore()
  probs, _ = evaluation.split_probabilities(restored.model, restored.params, run.config,
                                            ten_crop=ten_crop, mean=run.mean())
  names = run.class_names()
  for pred, i in zip(preds, EXAMPLES):
    order = np.argsort(-probs[i])[:5]
    assert pred['labels'] == list(order)
    assert pred['classes'] == [names[k] for k in order]
    np.testing.assert_allclose(pred['probabilities'], probs[i][order], atol=1e-5)
    assert all(np.diff(pred['probabilities']) <= 0)
    assert sum(pred['probabilities']) <= 1 + 1e-6


def test_output_lists_five_classes_per_image(tiny_workdir, tmp_path):
  paths = _write_test_digits(config_lib.read_saved(tiny_workdir)[0], tmp_path)
  text = predict.format_predictions(predict.predict_files(tiny_workdir, paths[:1]))
  lines = text.splitlines()
  assert lines[0] == paths[0] and len(lines) == 6
  assert all(line.strip().split()[0].endswith('%') for line in lines[1:])


def test_unreadable_image_is_named(tiny_workdir, tmp_path):
  bad = tmp_path / 'not_an_image.jpg'
  bad.write_bytes(b'this is text')
  with pytest.raises(predict.ImageReadError, match='not_an_image.jpg'):
    predict.predict_files(tiny_workdir, [str(bad)])
  with pytest.raises(predict.ImageReadError, match='missing.png: no such file'):
    predict.predict_files(tiny_workdir, [str(tmp_path / 'missing.png')])


def test_command_reports_a_workdir_without_checkpoint(tiny_workdir, tmp_path):
  empty = tmp_path / 'run'
  empty.mkdir()
  for name in ('config.json', 'classes.json'):
    (empty / name).write_text(open(os.path.join(tiny_workdir, name)).read())
  image = _write_test_digits(config_lib.read_saved(tiny_workdir)[0], tmp_path)[0]
  proc = conftest.run([sys.executable, '-m', 'alexnet_jax.paper.predict', f'--workdir={empty}',
                       image], cwd=tmp_path)
  assert proc.returncode == 2
  assert f'No checkpoints in {empty}' in proc.stderr and 'train first' in proc.stderr
  assert 'Traceback' not in proc.stderr
