"""The paper config on a miniature ILSVRC-2012 manual download, prepared by TFDS's real builder.

tfds.testing.mock_data (test_data_sources.py) replaces download_and_prepare, and so skips the
code that once failed here: preparing imagenet2012 from the tar files crashed in TFDS's
DatasetBuilder.code_path with "ModuleNotFoundError: No module named 'importlib_resources'".
This test writes the two tar files in the layout the builder reads (imagenet_miniature.py),
lets main.py prepare the dataset, train two steps and evaluate, then runs --mode=eval.
"""

import pytest
import io
import json
import os
import subprocess
import sys

import conftest
import imagenet_miniature  # tests/ is on sys.path (pytest's default 'prepend' import mode)
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

TIMEOUT_S = 600


def _main(*flags) -> str:
  """Runs main.py with the paper config; returns its output (stdout and stderr), which a
  failure shows (past TIMEOUT_S: conftest.run's AssertionError, the whole output printed)."""
  cmd = [sys.executable, os.path.join(conftest.ROOT, 'main.py'), '--config=configs/alexnet.py',
         *flags]
  # One CPU device instead of conftest's 8 simulated ones: on 2 cores the two commands took 61 s
  # against 82 s (cold compilation cache), a step 1.5 s against 10 s.
  proc = conftest.run(cmd, env=conftest.env_with_devices(1), timeout=TIMEOUT_S,
                      stderr=subprocess.STDOUT)
  returncode = proc.returncode
  if returncode != 0:
    print(proc.stdout)
  assert returncode == 0, f'{" ".join(cmd)} exited {returncode}:\n{proc.stdout[-20_000:]}'
  return proc.stdout


@pytest.mark.slow
def test_paper_config_prepares_trains_and_evaluates_a_miniature_imagenet(tmp_path):
  data, run = tmp_path / 'data', tmp_path / 'run'
  written = imagenet_miniature.write_manual_download(data)
  num_train, num_val = written['num_train'], written['num_val']
  flags = [f'--workdir={run}', f'--config.data_dir={data}', '--config.batch_size=8',
           '--config.eval_batch_size=8', '--config.num_train_steps=2',
           '--config.eval_every_steps=2', f'--config.stats_num_images={num_train}',
           '--config.log_every_steps=1']

  out = _main(*flags)
  assert 'step 2/2' in out, out[-5_000:]

  # TFDS prepared imagenet2012 under data_dir with every image written.
  builder = tfds.builder('imagenet2012', data_dir=str(data))
  assert builder.is_prepared()
  assert os.path.isdir(builder.data_dir) and builder.data_dir.startswith(
      os.path.join(str(data), 'imagenet2012', ''))
  splits = builder.info.splits
  assert sorted(splits.keys()) == ['train', 'validation']  # no test tar: no test split
  assert splits['train'].num_examples == num_train
  assert splits['validation'].num_examples == num_val

  # The training run: a checkpoint, the statistics and one evaluation over the val images.
  assert os.path.isdir(run / 'checkpoints' / '2')
  assert (run / 'data_stats.npz').exists()
  with open(run / 'metrics.jsonl', encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2]
  evals = [r for r in records if 'eval/num_examples' in r]
  assert [r['step'] for r in evals] == [2]
  assert evals[0]['eval/num_examples'] == num_val
  assert 0 <= evals[0]['eval/top1_error'] <= 1 and np.isfinite(evals[0]['eval/loss'])

  # The evaluation-only mode: the paper's 10-crop test on the same validation images.
  out = _main(*flags, '--mode=eval')
  assert 'ten_crop: top-1 error' in out and f'over {num_val} examples' in out, out[-5_000:]
  with open(run / 'eval_validation_ten_crop.json', encoding='utf-8') as f:
    result = json.load(f)
  assert result['eval/num_examples'] == num_val and result['step'] == 2

  # Every training image made it in, each decodable to 3 channels; the builder converted the
  # PNG and the CMYK JPEG on its lists to RGB JPEGs and stored the greyscale JPEG as it was.
  image_feature = builder.info.features['image']
  label_feature = builder.info.features['label']
  stored = {}
  for ex in builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()}):
    name = ex['file_name'].numpy().decode()
    stored[name] = (ex['image'].numpy(), label_feature.int2str(int(ex['label'])))
  expected = {n: s for s, names in written['train'].items() for n in names}
  assert {n: label for n, (_, label) in stored.items()} == expected
  for name, (encoded, _) in stored.items():
    assert tf.io.is_jpeg(encoded).numpy(), name
    assert image_feature.decode_example(tf.constant(encoded)).shape[-1] == 3, name
  modes = {kind: Image.open(io.BytesIO(stored[name][0])) for kind, name in
           written['special'].items()}
  assert set(modes) == {'png', 'cmyk', 'grey'}
  assert modes['png'].format == 'JPEG' and modes['png'].mode == 'RGB'  # png_to_jpeg
  assert modes['cmyk'].mode == 'RGB'  # jpeg_cmyk_to_rgb
  assert modes['grey'].mode == 'L'  # not on any list: kept, one channel
  grey = image_feature.decode_example(tf.constant(stored[written['special']['grey']][0])).numpy()
  assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0],
                                                                        grey[..., 2])

  # Validation labels come from TFDS's list of the 50,000 labels, in file-name order.
  val = {ex['file_name'].numpy().decode(): label_feature.int2str(int(ex['label']))
         for ex in builder.as_dataset(split='validation',
                                      decoders={'image': tfds.decode.SkipDecoding()})}
  assert val == dict(zip(written['val'], written['val_labels']))

  # The one-pass preparation reads the TFDS dataset (data/prepare.py's TFDS source): every image
  # once, the ILSVRC class names, the statistics of the training images; a run reads it back.
  from alexnet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from alexnet_jax.data import prepare  # pylint: disable=g-import-not-at-top
  prepared = tmp_path / 'prepared'
  settings = prepare.Settings(
      source='imagenet2012', data_dir=str(data), splits=('train', 'validation'),
      train_split='train', resize_size=256, antialias=True, quality=90, shard_size=4)
  index = prepare.prepare(settings, str(prepared), workers=1)
  assert [index['splits'][s]['num_examples'] for s in ('train', 'validation')] == [
      num_train, num_val]
  assert index['splits']['train']['num_unreadable'] == 0
  # An image the parallel stage would leave out is named by its ImageNet file name: this one is
  # readable, so the second, eager try says so.
  _, shards = prepare.plan(settings)
  where, why = prepare.why_unreadable(settings, shards[1], 0)
  assert where in stored and why == 'unreadable once, readable on a second try'
  assert index['class_names'] == list(label_feature.names)
  assert index['stats']['num_images'] == num_train
  config = conftest.config('alexnet', dataset='prepared', data_dir=str(prepared), batch_size=4,
                           eval_batch_size=4)
  batch = next(pipeline.train_iterator(config, mean=None, on_device=True))
  assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.uint8
  names = {label_feature.int2str(int(i)) for i in batch['label']}
  assert names <= set(written['train'])
