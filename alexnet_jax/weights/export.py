"""A trained run as a TensorFlow SavedModel for serving: uint8 images in, top-5 classes out.

  python -m alexnet_jax.weights.export --workdir=RUN --output=DIR [--checkpoint=best|latest] \
      [--ten_crop] [--platforms=cpu,cuda]

The SavedModel's 'serving_default' signature takes `images`, uint8 [N, H, W, 3] of any height
and width (one size per call), and returns, most probable first, 'classes' (string [N, 5]),
'probabilities' (float32 [N, 5]) and 'labels' (int32 [N, 5]). The 'single_image' signature takes
one uint8 [H, W, 3] `image` and returns the same without the batch dimension ([5]). Inside is
what `alexnet_jax.paper.predict` does to a decoded file, with the same functions: §2's square
(`sources.center_square`), the run's mean subtracted and the central patch, or §4.1's ten
patches (`augment.eval_patches`), the network and its softmax (`steps.probabilities`). Decode
files with tf.io.decode_png / decode_jpeg (channels=3) to get predict's pixels: a JPEG decoded
whole and then cropped matches predict's cropped decode (`decode_and_crop_jpeg`) up to the
decoder's rounding at the crop's edges.

Why jax2tf: JAX's export API (`jax.export`) alone serialises StableHLO that only JAX can load
and call; it is not a SavedModel, and cannot hold the preprocessing, which is TensorFlow ops.
`jax2tf.convert` (native serialisation, the only kind current JAX has) puts that same
`jax.export` artefact into the TensorFlow graph as one XlaCallModule op, beside the
preprocessing ops, so `tf.saved_model.load` and TensorFlow Serving run it without JAX (with
TensorFlow's XLA, which its CPU and GPU builds include; TFLite and TF.js cannot run it). The
network is lowered once per platform in --platforms (default cpu and cuda, both from any
machine: lowering needs no device); the op picks the one it runs on, and refuses any other.

The parameters are tf.Variables, not constants: they are arguments of the converted function,
so the StableHLO module and the graph stay small (constants would be folded into the module,
AlexNet's 240 MB of them), and they are saved in the SavedModel's variables/ like any
TensorFlow model's. The run's mean, class names and checkpoint step are variables too
(`loaded.mean`, `loaded.class_names`, `loaded.step`), and the run's config.json is an asset
(`loaded.run_config.asset_path`). The network uses the plain XLA kernels (`Kernels()`):
`jax.export` refuses the CPU's oneDNN calls, custom calls into this package's own library, which
no other process has.

The SavedModel is written to a temporary sibling of --output and renamed into place, so a failed
export leaves nothing at --output (on cloud storage, where a folder cannot be renamed at once,
the copy that the rename makes is not atomic). An --output that exists and is not empty is
refused.
"""

from __future__ import annotations

if __name__ == '__main__':  # A command: TensorFlow's start-up lines hidden before it loads.
  from alexnet_jax import cli as _cli
  _cli.quiet_tensorflow_logs()

import uuid
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import jax2tf
import tensorflow as tf

from alexnet_jax import cli
from alexnet_jax import paths
from alexnet_jax.core import run as run_lib
from alexnet_jax.core import steps
from alexnet_jax.core.kernels import Kernels
from alexnet_jax.data import augment
from alexnet_jax.data import sources
from alexnet_jax.paper import predict
from alexnet_jax.errors import UserError

PLATFORMS = ('cpu', 'cuda')  # where the exported network runs, by default
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # what jax2tf can lower for


class _Serving(tf.Module):
  """The exported module: the run's preprocessing, the converted network, the top-5."""

  def __init__(self, run: run_lib.Run, restored: run_lib.Restored, ten_crop: bool,
               platforms: Sequence[str]):
    super().__init__(name='alexnet')
    config = run.config
    self._resize_size = config.resize_size
    self._antialias = bool(config.resize_antialias)
    self._image_size = config.image_size
    self._ten_crop = ten_crop
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: tf.Variable(x, name='/'.join(str(k.key) for k in path)),
        restored.params)
    # Saved as a list: tf.Module wraps a dict attribute in its own type, which JAX's pytrees
    # do not know; the converted function is given the plain dict.
    self.params = jax.tree_util.tree_leaves(params)
    mean = run.mean()
    self.mean = None if mean is None else tf.Variable(mean, trainable=False, name='mean')
    self.class_names = tf.Variable(run.class_names(), trainable=False, name='class_names')
    self.step = tf.Variable(restored.step, dtype=tf.int64, trainable=False, name='step')
    self.run_config = tf.saved_model.Asset(
        str(paths.resolve(run.workdir) / run_lib.CONFIG_FILENAME))
    model = restored.model
    network = jax2tf.convert(
        lambda params, images: steps.probabilities(params, images, model=model),
        polymorphic_shapes=[None, '(b, ...)'],  # any batch size; the patches' shape is fixed
        with_gradient=False, native_serialization_platforms=tuple(platforms))
    self._probabilities = lambda patches: network(params, patches)
    patch = [self._image_size, self._image_size, 3]
    self._patches_spec = tf.TensorSpec([10] + patch if ten_crop else patch, tf.float32)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')],
               autograph=False)
  def predict(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
    """Top-5 'classes', 'probabilities' and 'labels' [N, 5] of uint8 images [N, H, W, 3]."""
    squares = sources.center_square(images, self._resize_size, self._antialias)
    patches = tf.map_fn(
        lambda square: augment.eval_patches(square, self.mean, self._image_size,
                                            self._ten_crop),
        squares, fn_output_signature=self._patches_spec)
    num_classes = int(self.class_names.shape[0])
    # The converted network's batch dimension must be >= 1 (jax.export's shape polymorphism).
    probs = tf.cond(tf.shape(patches)[0] > 0, lambda: self._probabilities(patches),
                    lambda: tf.zeros([0, num_classes], tf.float32))
    values, labels = tf.math.top_k(probs, min(predict.TOP_K, num_classes))
    return {'classes': tf.gather(self.class_names, labels), 'probabilities': values,
            'labels': tf.cast(labels, tf.int32)}

  @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name='image')],
               autograph=False)
  def predict_image(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
    """`predict` of one uint8 image [H, W, 3]: outputs [5]."""
    return {name: value[0] for name, value in self.predict(image[tf.newaxis]).items()}


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """`platforms` as a tuple, or a UserError naming the unknown ones."""
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if unknown or not platforms:
    raise UserError(f'--platforms={",".join(platforms)}: unknown {unknown}; give one or more '
                    f'of {",".join(KNOWN_PLATFORMS)}')
  return tuple(dict.fromkeys(platforms))


def _check_output(output: str) -> None:
  """A UserError where `output` is a file or a folder with something in it."""
  path = paths.resolve(output)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise UserError(f'--output={output} exists and is not an empty folder: give a new one, or '
                    'remove it first (an export never overwrites anything).')


def export_saved_model(workdir: str, output: str, *, which: str = 'best',
                       ten_crop: bool = False, platforms: Sequence[str] = PLATFORMS) -> str:
  """Writes the run in `workdir` as a SavedModel at `output` (see the module docstring).

  `which`: the 'best' or the 'latest' checkpoint; `ten_crop`: serve §4.1's average over ten
  patches instead of the central patch; `platforms`: where the SavedModel can run. Raises a
  UserError (RunError...) before any work for a workdir that is no run, an `output` that exists
  and is not empty, or an unknown platform. Returns the path written.
  """
  platforms = check_platforms(platforms)
  # TensorFlow's conversion and saving set absl's logger to WARNING (a process-wide setting that
  # would silence the caller's INFO lines from then on): it is put back afterwards.
  level = logging.get_absl_logger().level
  try:
    return _export(workdir, output, which, ten_crop, platforms)
  finally:
    logging.get_absl_logger().setLevel(level)


def _export(workdir: str, output: str, which: str, ten_crop: bool,
            platforms: Sequence[str]) -> str:
  run = run_lib.open_run(workdir)
  _check_output(output)
  cli.prepare_output(output)
  logging.info('Restoring the %s checkpoint of %s', which, run.workdir)
  # The plain XLA kernels: no oneDNN custom calls in the exported graph (see the docstring).
  restored = run.restore(which=which, kernels=Kernels())
  logging.info('Converting the network of step %d for %s (%s), for %s', restored.step,
               output, 'ten crops averaged' if ten_crop else 'centre crop', ', '.join(platforms))
  module = _Serving(run, restored, ten_crop, platforms)
  signatures = {'serving_default': module.predict.get_concrete_function(),
                'single_image': module.predict_image.get_concrete_function()}
  final = paths.resolve(output)
  temporary = final.parent / f'.{final.name}.tmp-{uuid.uuid4().hex[:8]}'
  logging.info('Saving to %s (through %s)', output, temporary)
  try:
    tf.saved_model.save(module, str(temporary), signatures=signatures)
    if final.exists():  # an empty folder, checked above: the rename needs its name free
      final.rmdir()
    tf.io.gfile.rename(str(temporary), str(final))
  finally:
    if temporary.exists():
      tf.io.gfile.rmtree(str(temporary))
  logging.info('Wrote %s', output)
  return str(final)


def _define_flags() -> None:
  # Only when run as a command: importing the library must not claim global flag names.
  flags.DEFINE_string('workdir', None, 'Workdir of a trained run.')
  flags.DEFINE_string('output', None, 'Folder to write the SavedModel to (new, or empty).')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint to export.')
  flags.DEFINE_bool('ten_crop', False, "Serve the average softmax of §4.1's ten patches.")
  flags.DEFINE_list('platforms', list(PLATFORMS),
                    f'Where the SavedModel can run: some of {",".join(KNOWN_PLATFORMS)}.')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv: Sequence[str]) -> None:
  """Exports --workdir's checkpoint as a SavedModel at --output."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  path = export_saved_model(f.workdir, f.output, which=f.checkpoint, ten_crop=f.ten_crop,
                            platforms=f.platforms)
  print(f'Wrote {path}: serving_default takes uint8 images [N, H, W, 3] and returns the top-5 '
        f"'classes', 'probabilities' and 'labels'; runs on {', '.join(f.platforms)}.")


if __name__ == '__main__':
  cli.run(main, _define_flags)
