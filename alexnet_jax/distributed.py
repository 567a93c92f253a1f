"""The processes of one run: JAX's multi-controller runtime, started before anything else.

A run on several hosts (a TPU pod slice, a GPU cluster) is one Python process per host, all
running the same command; `jax.distributed.initialize` connects them through a coordinator (a
gRPC service in process 0), after which `jax.devices()` lists every process's devices and a
`pmap` collective spans them all. `initialize` decides whether the run spans processes:

- given: `--coordinator_address`, `--num_processes`, `--process_id` (or the environment
  variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); or
- detected by JAX itself: Cloud TPU VMs and pod slices, SLURM (`srun`), Open MPI, Kubernetes;
- otherwise a single process, and nothing is started.

On the CPU backend the processes exchange data through Gloo (TCP). If a process dies, JAX's
coordination service stops the others once their heartbeats say so (`heartbeat_timeout_s`): the
run then ends on every host, and rerunning the command on every host resumes it from the last
checkpoint.
"""

from __future__ import annotations

import os

from absl import logging

from alexnet_jax.errors import UserError

# JAX reads JAX_COORDINATOR_ADDRESS itself; the other two are read here, under the same prefix.
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
HEARTBEAT_TIMEOUT_S = 100  # JAX's default.


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{name}={value!r} must be an integer') from None


def detected_cluster() -> str | None:
  """The name of the cluster environment JAX recognises here (SLURM, Cloud TPU, ...), or None.

  Uses JAX's own detectors (a private module, hence the guard): each checks environment
  variables or local files, none waits on the network.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if not env.opt_in_only_method and env.is_env_present():
        return env.__name__
  except Exception as e:  # pylint: disable=broad-except  (a changed private API: no detection)
    logging.warning('Could not ask JAX which cluster this is (%s); give --coordinator_address, '
                    '--num_processes and --process_id for a run over several processes.', e)
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
  """Starts JAX's multi-process runtime if this run spans processes; returns whether it did.

  Must run before anything asks JAX for its devices. Arguments left None come from the
  environment variables above, then from the cluster JAX detects.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  given = (coordinator_address, num_processes, process_id)
  cluster = None
  if all(v is None for v in given):
    cluster = detected_cluster()
    if cluster is None:
      return False  # One process: nothing to start.
  elif any(v is None for v in given) and detected_cluster() is None:
    raise UserError('A run over several processes needs all of --coordinator_address=HOST:PORT '
                    '(process 0\'s), --num_processes=N and --process_id=I (0..N-1), on every '
                    'process; only JAX-detected clusters (Cloud TPU, SLURM, ...) may leave them '
                    f'out. Given: coordinator_address={coordinator_address}, num_processes='
                    f'{num_processes}, process_id={process_id}.')
  if num_processes is not None and num_processes < 1:
    raise UserError(f'--num_processes={num_processes} must be >= 1')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise UserError(f'--process_id={process_id} must be in 0..{num_processes - 1}')
  if heartbeat_timeout_s < 1:
    raise UserError(f'--heartbeat_timeout_s={heartbeat_timeout_s} must be >= 1')
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on the CPU backend (no effect on GPUs and TPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info('Process %d of %d%s: %d local devices of %d in all (%s).', jax.process_index(),
               jax.process_count(), f' ({cluster} detected)' if cluster else '',
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  return True


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process of the run reaches `barrier(name)` (nothing in one process).

  Through the coordination service, with `timeout_s`: a collective such as
  `multihost_utils.sync_global_devices` would give up after ~30 s on the CPU backend (Gloo's
  set-up), too short for one process's work while the others wait (a dataset prepared by
  process 0, a benchmark point run on one host). Each name may be waited on once.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def define_flags() -> None:
  """The flags of `initialize`, for the commands that train or evaluate."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, where JAX\'s '
                      f'coordinator listens (or ${ENV_COORDINATOR}); not needed where JAX '
                      'detects the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes).')
  flags.DEFINE_integer('num_processes', None, f'Processes in the run (or ${ENV_NUM_PROCESSES}).')
  flags.DEFINE_integer('process_id', None, f'This process, 0..N-1 (or ${ENV_PROCESS_ID}).')
  flags.DEFINE_integer('heartbeat_timeout_s', HEARTBEAT_TIMEOUT_S, 'Seconds without a heartbeat '
                       'after which a process counts as dead and every process of the run stops.')


def initialize_from_flags() -> bool:
  """`initialize` with the values of `define_flags`'s flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id, f.heartbeat_timeout_s)
