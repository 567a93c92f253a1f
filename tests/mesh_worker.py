"""A test worker: trains configs/tiny.py's two-column net with 'columns' and then 'hybrid' for a
few steps through `parallel.Placement`, as one process of a run or alone, and saves process 0's
parameters.

  python tests/mesh_worker.py OUT_PREFIX [COORDINATOR NUM_PROCESSES PROCESS_ID]

The global batches are fixed random ones; each process feeds its own rows of each (process p the
p-th slice, as the input pipeline does). No TensorFlow: a process starts in ~2 s.
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alexnet_jax import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position
from alexnet_jax.core import kernels as kernels_lib  # pylint: disable=wrong-import-position
from alexnet_jax.core import parallel  # pylint: disable=wrong-import-position
from alexnet_jax.core import steps  # pylint: disable=wrong-import-position
from configs import tiny  # pylint: disable=wrong-import-position

NUM_STEPS = 3
# 'hybrid' splits the fully connected layers over 4 devices in both layouts (its default is one
# host's devices: 4 of 2x4, 8 of 1x8).
MODEL_PARALLEL = {'columns': 0, 'hybrid': 4}


def train(strategy: str) -> dict[str, np.ndarray]:
  config = tiny.get_config()
  config.parallelism, config.model_parallel = strategy, MODEL_PARALLEL[strategy]
  model, tx, state = steps.initial_state(config, kernels_lib.resolve(config, jax.devices()))
  placement = parallel.Placement(config, model, tx, state)
  device_state = placement.put_state(state)
  rng = np.random.default_rng(0)
  b, n, p = config.batch_size, jax.process_count(), jax.process_index()
  for step in range(NUM_STEPS):
    batch = {'image': rng.standard_normal((b, config.image_size, config.image_size, 3),
                                          np.float32),
             'label': rng.integers(0, config.num_classes, b).astype(np.int32)}
    mine = {k: v[p * b // n:(p + 1) * b // n] for k, v in batch.items()}
    device_state, metrics, _ = placement.train_step(
        device_state, placement.put_batch(mine), np.float32(0.01), placement.stop_votes(False))
    print(f'{strategy} step {step + 1}: loss {float(parallel.first_value(metrics["train/loss"])):.5f}',
          flush=True)
  host = placement.host_state(device_state)
  return {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_leaves_with_path(host.params)}


def main(argv: list[str]) -> None:
  out = argv[1]
  if len(argv) > 2:
    distributed.initialize(argv[2], int(argv[3]), int(argv[4]), heartbeat_timeout_s=20)
  for strategy in MODEL_PARALLEL:
    params = train(strategy)
    if jax.process_index() == 0:
      np.savez(f'{out}_{strategy}.npz', **params)


if __name__ == '__main__':
  main(sys.argv)
