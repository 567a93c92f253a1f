"""A run over several processes, on this machine: 2 processes x 2 simulated CPU devices talking
through JAX's coordinator and Gloo on 127.0.0.1, against 1 process x 4 devices.

Each case starts `main.py` processes with bounded timeouts and kills whatever is left of them on
the way out. The ports are free ones the OS hands out.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alexnet_jax.core import checkpoints
from alexnet_jax.core import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per group of processes; a healthy start + 4 tiny steps takes ~50 s here.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              PYTHONUNBUFFERED='1')


def _main(workdir, *flags) -> list[str]:
  return [sys.executable, os.path.join(ROOT, 'main.py'),
          f'--config={os.path.join(ROOT, "configs", "tiny.py")}', f'--workdir={workdir}', *flags]


class _Processes:
  """`n` processes of one run (n=1: a plain single-process run), killed on exit."""

  def __init__(self, tmp_path, workdir, n, *flags, devices=None):
    self.procs, self.logs = [], []
    port = _free_port()
    for i in range(n):
      cluster = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={n}',
                  f'--process_id={i}'] if n > 1 else [])
      log = tmp_path / f'{os.path.basename(str(workdir))}_{i}_{time.time_ns()}.log'
      self.logs.append(log)
      with open(log, 'w', encoding='utf-8') as f:
        self.procs.append(subprocess.Popen(
            _main(workdir, *cluster, *flags), stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=_env(devices or 4 // n), start_new_session=True))

  def log(self, i: int) -> str:
    return self.logs[i].read_text(encoding='utf-8')

  def wait(self, timeout=TIMEOUT_S) -> list[int]:
    deadline = time.time() + timeout
    return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]

  def wait_for(self, i: int, text: str, timeout=TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while text not in self.log(i):
      assert time.time() < deadline, f'no {text!r} in process {i}\'s log:\n{self.log(i)[-3000:]}'
      assert self.procs[i].poll() is None, f'process {i} ended:\n{self.log(i)[-3000:]}'
      time.sleep(0.5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for p in self.procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _check_ok(group: _Processes) -> None:
  codes = group.wait()
  for i, code in enumerate(codes):
    assert code == 0, f'process {i} exited with {code}:\n{group.log(i)[-4000:]}'


def _params(workdir):
  return run_lib.open_run(workdir).restore('latest').params


def _eval_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != 'time'} for r in records if 'eval/loss' in r]


def test_two_processes_train_and_evaluate_like_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  with _Processes(tmp_path, one, 1) as group:
    _check_ok(group)
  with _Processes(tmp_path, two, 2) as group:
    _check_ok(group)
    assert 'Process 1 of 2: 2 local devices of 4 in all' in group.log(1)
  # The same global batches, dropout masks (folded with the global device index), pmean and
  # learning rate: the same parameters up to float32 summation order.
  a, b = _params(one), _params(two)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # Process 0 alone wrote the metrics; its evaluation counted every example once.
  assert _eval_records(one) == _eval_records(two)
  assert _eval_records(two)[-1]['eval/num_examples'] == 128

  # --mode=eval in 2 processes of the checkpoint the 1-process run evaluated at its last step:
  # the same counts and errors.
  with _Processes(tmp_path, one, 2, '--mode=eval', '--checkpoint=latest') as group:
    _check_ok(group)
  with open(one / 'eval_test_center_crop.json', encoding='utf-8') as f:
    result = json.load(f)
  assert result.pop('step') == 4
  assert result == {k: v for k, v in _eval_records(one)[-1].items() if k != 'step'}


def test_sigterm_on_one_process_stops_both_after_the_same_step(tmp_path):
  workdir = tmp_path / 'run'
  flags = ['--config.num_train_steps=1000000', '--config.eval_every_steps=1000000',
           '--config.log_every_steps=100']
  with _Processes(tmp_path, workdir, 2, *flags) as group:
    group.wait_for(1, 'First step')
    group.procs[1].send_signal(signal.SIGTERM)  # One host is preempted.
    _check_ok(group)
    stopped = []
    for i in range(2):
      line = next(l for l in group.log(i).splitlines() if 'Stopped at step' in l)
      stopped.append(int(line.split('Stopped at step ')[1].split()[0]))
  assert stopped[0] == stopped[1], stopped
  manager = checkpoints.create_manager(str(workdir), 2, read_only=True)
  try:
    assert manager.latest_step() == stopped[0]
  finally:
    manager.close()
  assert run_lib.open_run(workdir).restore('latest').step == stopped[0]


@pytest.mark.parametrize('killed', [1, 0])
def test_a_killed_process_stops_the_other_within_the_heartbeat_timeout(tmp_path, killed):
  workdir = tmp_path / 'run'
  heartbeat_s = 5
  flags = ['--config.num_train_steps=1000000', '--config.eval_every_steps=1000000',
           '--config.log_every_steps=100', f'--heartbeat_timeout_s={heartbeat_s}']
  survivor = 1 - killed
  with _Processes(tmp_path, workdir, 2, *flags) as group:
    group.wait_for(survivor, 'First step')
    os.killpg(group.procs[killed].pid, signal.SIGKILL)
    t0 = time.time()
    code = group.procs[survivor].wait(timeout=heartbeat_s + 60)
    waited = time.time() - t0
  assert code != 0
  assert waited < heartbeat_s + 30, waited
  log = group.log(survivor)
  # Killed: process 1 (the coordinator in process 0 notices its missing heartbeats) or process
  # 0 (the collective in process 1 fails at once): either way the survivor says why.
  assert ('another task died' in log or 'lost the other processes' in log), log[-4000:]
