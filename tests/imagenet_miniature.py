"""A miniature ILSVRC-2012 manual download, in the layout TFDS's real `imagenet2012` builder reads.

    <data_dir>/downloads/manual/ILSVRC2012_img_train.tar   one tar per synset (n01751748.tar, ...),
                                                          each holding n01751748_<k>.JPEG files
    <data_dir>/downloads/manual/ILSVRC2012_img_val.tar     ILSVRC2012_val_00000001.JPEG, ...

What the installed builder (tensorflow_datasets/datasets/imagenet2012/
imagenet2012_dataset_builder.py and imagenet_common.py, TFDS 4.9) does with them, and so why the
names below:

- Train labels are the inner tar's name minus '.tar'; the JPEG names are only keys.
- Validation labels come from validation_labels.txt shipped with TFDS (50,000 lines, the labels
  of ILSVRC2012_val_00000001 ... 00050000 in order), zipped *by position* with the sorted member
  names of the val tar: the k-th name in sorted order gets line k, whatever its number. So only
  ILSVRC2012_val_00000001 ... 0000000N (contiguous from 1) are labelled correctly; a tar holding,
  say, val_00000003 alone would label it with line 1. `VAL_LABELS` holds the first lines.
- Fix-ups by *file name*, nothing else is inspected: the 22 names of CMYK_IMAGES go through
  `jpeg_cmyk_to_rgb`, the one name of PNG_IMAGES ('n02105855_2933.JPEG') through `png_to_jpeg`.
  Every other file is stored byte for byte: a greyscale JPEG stays a 1-channel JPEG (decoding
  with channels=3 makes it RGB), and a PNG under another .JPEG name stays PNG bytes in the
  'jpeg' Image feature (tf.image.decode_image still reads it). The default synsets are chosen so
  that the PNG and a CMYK image carry the listed names and take the builder's conversion path.
- ILSVRC2012_img_test.tar is optional (a missing split is only logged), so none is written.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

# Synset 1: the label of ILSVRC2012_val_00000001 (so train and validation share a class).
# Synset 2: has an image on the builder's CMYK list. Synset 3: the PNG list's synset (and the
# label of ILSVRC2012_val_00000003).
SYNSETS = ('n01751748', 'n02077923', 'n02105855')
CMYK_FILE = 'n02077923_14822.JPEG'  # on imagenet2012_dataset_builder.CMYK_IMAGES
PNG_FILE = 'n02105855_2933.JPEG'  # imagenet2012_dataset_builder.PNG_IMAGES: a PNG named .JPEG
GREY_FILE = 'n01751748_1002.JPEG'  # on no list: stored as is
# The first lines of TFDS's validation_labels.txt: the labels of ILSVRC2012_val_00000001, ...
VAL_LABELS = ('n01751748', 'n09193705', 'n02105855', 'n04263257', 'n03125729', 'n01735189',
              'n02346627', 'n02776631')
# (width, height) of typical ILSVRC-2012 images.
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300))


def val_file_name(index: int) -> str:
  """The name of the `index`-th (from 1) validation image."""
  return f'ILSVRC2012_val_{index:08d}.JPEG'


def _picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
  """A smooth random colour field plus noise: uint8 [height, width, 3], compresses like a photo."""
  coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32)
  noisy = smooth + rng.normal(0, 12, size=smooth.shape)
  return np.clip(noisy, 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, kind: str) -> bytes:
  image = Image.fromarray(pixels)
  if kind == 'grey':
    image = image.convert('L')
  elif kind == 'cmyk':
    image = image.convert('CMYK')
  buffer = io.BytesIO()
  image.save(buffer, format='PNG' if kind == 'png' else 'JPEG', quality=90)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)  # a bare name: the builder takes labels from member names
  info.size = len(data)
  info.mtime = 0
  tar.addfile(info, io.BytesIO(data))


def train_file_names(synsets=SYNSETS, images_per_synset: int = 4) -> dict[str, list[str]]:
  """{synset: its JPEG names}; the special names (CMYK, PNG, grey) first where they fit."""
  names = {}
  for synset in synsets:
    special = [f for f in (CMYK_FILE, PNG_FILE, GREY_FILE) if f.startswith(synset + '_')]
    plain = [f'{synset}_{10_000 + k}.JPEG' for k in range(images_per_synset)]
    names[synset] = (special + plain)[:images_per_synset]
  return names


def _kind(name: str) -> str:
  return {CMYK_FILE: 'cmyk', PNG_FILE: 'png', GREY_FILE: 'grey'}.get(name, 'rgb')


def write_manual_download(data_dir, synsets=SYNSETS, images_per_synset: int = 4,
                          num_val: int = 6, seed: int = 0) -> dict:
  """Writes the two tar files under <data_dir>/downloads/manual/.

  Returns a summary: 'train' {synset: [file names]}, 'val' [file names], 'val_labels' (the
  synset TFDS will give each validation file), 'num_train', 'num_val', 'special' {kind: name}
  for the CMYK, PNG and greyscale files actually written, and 'manual_dir'.
  """
  if not 1 <= num_val <= len(VAL_LABELS):
    raise ValueError(f'num_val must be 1..{len(VAL_LABELS)}, got {num_val}')
  rng = np.random.default_rng(seed)
  manual_dir = os.path.join(os.fspath(data_dir), 'downloads', 'manual')
  os.makedirs(manual_dir, exist_ok=True)
  train = train_file_names(synsets, images_per_synset)
  count = 0

  def next_image(kind: str) -> bytes:
    nonlocal count
    width, height = SIZES[count % len(SIZES)]
    count += 1
    return _encode(_picture(rng, width, height), kind)

  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for synset, names in train.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as tar:
        for name in names:
          _add(tar, name, next_image(_kind(name)))
      _add(outer, f'{synset}.tar', inner.getvalue())

  val = [val_file_name(i) for i in range(1, num_val + 1)]
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as tar:
    for name in val:
      _add(tar, name, next_image('rgb'))

  written = {n for names in train.values() for n in names}
  return {
      'manual_dir': manual_dir,
      'train': train,
      'val': val,
      'val_labels': list(VAL_LABELS[:num_val]),
      'num_train': len(written),
      'num_val': num_val,
      'special': {_kind(n): n for n in (CMYK_FILE, PNG_FILE, GREY_FILE) if n in written},
  }
