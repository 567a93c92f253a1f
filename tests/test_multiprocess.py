"""main.py end to end, and runs over several processes on this machine: 2 processes x 2 or 4
simulated CPU devices talking through JAX's coordinator and Gloo on 127.0.0.1, against 1 process
of as many devices, for the data strategy (pmap) and for the meshes of 'columns' and 'hybrid'.

Each case starts `main.py` processes with bounded timeouts and kills whatever is left of them on
the way out. The ports are free ones the OS hands out.
"""

import contextlib
import json
import os
import signal
import sys
import time

import jax
import numpy as np
import pytest

from alexnet_jax.core import checkpoints
from alexnet_jax.core import metrics
from alexnet_jax.core import run as run_lib

import conftest

TIMEOUT_S = 240  # per group of processes; a healthy start + 4 tiny steps takes ~50 s here.


def _env(devices: int) -> dict[str, str]:
  return dict(conftest.env_with_devices(devices), PYTHONUNBUFFERED='1')


def _main(workdir, *flags) -> list[str]:
  return [sys.executable, os.path.join(conftest.ROOT, 'main.py'), f'--config={conftest.TINY}',
          f'--workdir={workdir}', *flags]


@contextlib.contextmanager
def _processes(tmp_path, workdir, *flags, devices=2):
  """The 2 processes of one run, `devices` simulated CPU devices each, killed on exit; their
  logs (stdout and stderr) in `tmp_path`."""
  with conftest.Processes(log_dir=tmp_path) as group:
    port = conftest.free_port()
    for i in range(2):
      cluster = [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}']
      group.start(_main(workdir, *cluster, *flags), cwd=tmp_path, env=_env(devices),
                  name=os.path.basename(str(workdir)))
    yield group


def _check_ok(group: conftest.Processes) -> None:
  codes = group.wait(timeout=TIMEOUT_S)
  for i, code in enumerate(codes):
    assert code == 0, f'process {i} exited with {code}:\n{group.output(i)[-4000:]}'


def _params(workdir):
  return run_lib.open_run(workdir).restore('latest').params


def _records(workdir):
  return metrics.read_jsonl(workdir / 'metrics.jsonl')


def _stopped_at(log: str) -> int:
  line = next(l for l in log.splitlines() if 'Stopped at step' in l)
  return int(line.split('Stopped at step ')[1].split()[0])


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_after_the_same_step_and_the_rerun_ends_as_one_run(
    tmp_path):
  two = tmp_path / 'two'
  # 'hybrid' over 2 processes x 4 devices (a mesh whose data axis spans the processes, the fully
  # connected layers split over each host's 4 devices), until SIGTERM reaches one of them (a
  # preempted host): both stop after the same step and save one checkpoint there.
  hybrid = ['--config.eval_every_steps=1000000', '--config.parallelism=hybrid']
  with _processes(tmp_path, two, *hybrid, '--config.num_train_steps=1000000',
                  devices=4) as group:
    # Sent once both loops have started (their handlers in place; either may log first): a
    # step's vote carries it, and every process reads that vote after the next step.
    for i in range(2):
      group.wait_for(i, 'Training steps', timeout=TIMEOUT_S)
    assert 'Process 1 of 2: 4 local devices of 8 in all' in group.output(1)
    assert "mesh {'data': 2, 'model': 4}" in group.output(0)
    group.procs[1].send_signal(signal.SIGTERM)
    _check_ok(group)
    steps = [_stopped_at(group.output(i)) for i in range(2)]
  assert steps[0] == steps[1] >= 2, steps
  manager = checkpoints.create_manager(str(two), 2, read_only=True)
  try:
    assert manager.all_steps() == [steps[0]]
  finally:
    manager.close()
  assert run_lib.open_run(two).restore('latest').step == steps[0]

  # The same command, to 2 steps further, resumes there and ends where one uninterrupted run of
  # 1 process x 8 devices ends (trained here, in the test's own 8-device process), up to the
  # float32 round-off of the two layouts after 4 steps (as the data strategy's test below).
  total = steps[0] + 2
  with _processes(tmp_path, two, *hybrid, f'--config.num_train_steps={total}',
                  devices=4) as group:
    _check_ok(group)
    assert f'Resuming from the checkpoint of step {steps[0]}' in group.output(0)
  one = conftest.train_tiny(tmp_path / 'one', parallelism='hybrid', model_parallel=4,
                            num_train_steps=total)
  for x, y in zip(jax.tree_util.tree_leaves(_params(one)),
                  jax.tree_util.tree_leaves(_params(two))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_columns_and_hybrid_over_two_processes_train_as_over_one(tmp_path):
  """2 processes x 4 devices train the two-column net 3 steps with 'columns' and with 'hybrid'
  (tests/mesh_worker.py) and end with the parameters of 1 process x 8 devices: the same global
  batches, dropout keys (the device's place in the mesh) and gradient sums, up to float32
  summation order."""
  port = conftest.free_port()
  with conftest.Processes() as group:
    for i in range(2):
      group.start([sys.executable, os.path.join(conftest.ROOT, 'tests', 'mesh_worker.py'),
                   str(tmp_path / 'two'), f'127.0.0.1:{port}', '2', str(i)], cwd=None,
                  env=_env(4))
    sys.path.insert(0, os.path.join(conftest.ROOT, 'tests'))
    import mesh_worker  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    one = {strategy: mesh_worker.train(strategy) for strategy in mesh_worker.MODEL_PARALLEL}
    for i in range(2):
      code = group.wait_one(i, timeout=TIMEOUT_S)
      assert code == 0, f'process {i}:\n{group.output(i)[-4000:]}'
  for strategy, params in one.items():
    with np.load(tmp_path / f'two_{strategy}.npz') as two:
      assert sorted(two.files) == sorted(params)
      for name, value in params.items():
        np.testing.assert_allclose(two[name], value, rtol=1e-5, atol=1e-6,
                                   err_msg=f'{strategy} {name}')


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(tmp_path):
  two, one = tmp_path / 'two', tmp_path / 'one'
  # A fixed number of steps: float32 round-off between the two layouts grows with the steps
  # (a max-pool tie on the digits' flat background can break the other way after ~5).
  num_steps = 4
  with _processes(tmp_path, two, f'--config.num_train_steps={num_steps}',
                  devices=4) as group:
    _check_ok(group)
    assert 'Process 1 of 2: 4 local devices of 8 in all' in group.output(1)
    log = group.output(0)  # (process 0 reports the run's progress)
    assert f'step {num_steps}/{num_steps}' in log and 'eval top-1 error' in log

  # 1 process x 8 devices (this test's own) for as many steps: the same global batches, dropout
  # masks (folded with the global device index), pmean and learning rate, hence the same
  # parameters up to float32 summation order.
  conftest.train_tiny(one, num_train_steps=num_steps)
  for x, y in zip(jax.tree_util.tree_leaves(_params(one)), jax.tree_util.tree_leaves(
      _params(two))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # What a run writes (process 0 alone in the 2-process run): metrics once per step, the
  # config, TensorBoard events, the checkpoint, and an evaluation at the last step, which
  # counts the same in both.
  for workdir in (one, two):
    train_records = [r for r in _records(workdir) if 'train/loss' in r]
    assert [r['step'] for r in train_records] == list(range(1, num_steps + 1))
    for key in ('train/loss', 'train/top1_error', 'lr', 'train/images_per_sec'):
      assert key in train_records[-1]
    assert (workdir / 'config.json').exists() and os.listdir(workdir / 'tensorboard')
    assert (workdir / 'checkpoints' / str(num_steps)).is_dir()
  last = [r for r in _records(one) if 'eval/loss' in r][-1]
  last_two = [r for r in _records(two) if 'eval/loss' in r][-1]
  for key in ('step', 'eval/top1_error', 'eval/top5_error', 'eval/num_examples'):
    assert last_two[key] == last[key], key
  # tiny: 2 evaluation batches of 64; errors are counts of those 128 examples, top-5 <= top-1.
  assert last['step'] == num_steps and last['eval/num_examples'] == 128
  for key in ('eval/top1_error', 'eval/top5_error'):
    assert last[key] * 128 == pytest.approx(round(last[key] * 128), abs=1e-6)
  assert last['eval/top5_error'] <= last['eval/top1_error'] and last['eval/loss'] > 0

  # --mode=eval in 2 processes reads back the checkpoint the 1-process run evaluated at its last
  # step: the same counts and errors (every example counted once over the processes), the loss
  # up to summation order.
  with _processes(tmp_path, one, '--mode=eval', '--checkpoint=latest') as group:
    _check_ok(group)
  with open(one / 'eval_test_center_crop.json', encoding='utf-8') as f:
    again = json.load(f)
  assert again['step'] == num_steps
  for key in ('eval/top1_error', 'eval/top5_error', 'eval/num_examples'):
    assert again[key] == last[key], key
  assert again['eval/loss'] == pytest.approx(last['eval/loss'], rel=1e-6)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_within_the_heartbeat_timeout(tmp_path):
  """Process 1 dies (kill -9) while process 0, which hosts the coordinator, waits for it in the
  step's all-reduce: the missing heartbeats end process 0 with JAX's message instead of a hang.
  (The other case, process 0 dying, fails process 1's next collective at once:
  test_train.py::test_a_failed_collective_says_another_process_is_gone.)"""
  heartbeat_s = 5
  flags = ['--config.dataset=synthetic', '--config.num_train_steps=1000000',
           '--config.eval_every_steps=1000000', f'--heartbeat_timeout_s={heartbeat_s}',
           '--config.parallelism=columns']  # (a mesh over both processes)
  with _processes(tmp_path, tmp_path / 'run', *flags, devices=4) as group:
    group.wait_for(0, 'First step', timeout=TIMEOUT_S)
    group.kill(1)
    t0 = time.time()
    code = group.wait_one(0, timeout=heartbeat_s + 60)
    waited = time.time() - t0
  assert code != 0
  assert waited < heartbeat_s + 30, waited
  assert 'another task died' in group.output(0), group.output(0)[-4000:]
