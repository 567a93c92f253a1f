"""Where a run's files live: a local folder or cloud storage (gs://bucket/..., s3://...).

Every file of a run (config.json, classes.json, metrics.jsonl, data_stats.npz, eval results,
checkpoints through Orbax) is read and written through etils' `epath`, which Orbax and
tensorflow-datasets use too: local paths through the OS, gs:// through tf.io.gfile (or gcsfs).
TensorBoard events go through tf.io.gfile, which handles the same URLs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a local one absolute with ~ expanded, a URL as it is."""
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names cloud storage (scheme://...) rather than a local file."""
  return '://' in os.fspath(path)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` to `path` whole or not at all (a temporary file renamed over it), creating
  its folder."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + '.tmp')
  if isinstance(data, bytes):
    tmp.write_bytes(data)
  else:
    tmp.write_text(data, encoding='utf-8')
  tmp.replace(path)


def cache_dir() -> str:
  """The one place the package writes outside a run's workdir: `$ALEXNET_JAX_CACHE`, default
  ~/.cache/alexnet_jax (the compiled oneDNN library; TensorFlow's Keras settings file, which
  `import tensorflow` writes, via KERAS_HOME)."""
  return os.environ.get('ALEXNET_JAX_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache', 'alexnet_jax'))


def write_json(path: str, data: Any, indent: int = 2) -> None:
  """Writes a command's JSON result to `path` (whole or not at all), creating its folder; in a
  run of several processes, process 0 writes it (every process holds the same result)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  write_atomic(path, json.dumps(data, indent=indent))

