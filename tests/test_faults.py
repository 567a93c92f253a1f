"""Faults injected into real runs of configs/tiny.py (`python main.py`), and what survives them.

Each test starts the training command as a separate process, as a user (or a scheduler) would,
hurts it, reruns the same command and compares the end with an uninterrupted run of the same
config, bit for bit: parameters, optimizer state, step, RNG and the metrics history.

  kill -9 at random points of a step, of a checkpoint being written, of an evaluation
  SIGTERM (preemption) at random steps, then a restart
  a checkpoint damaged on disk (a file truncated, a file removed)
  a disk that runs full while a checkpoint is written (a small tmpfs)
  a config that cannot continue the checkpoints, and one that safely can

The soak variant runs many more trials: ALEXNET_JAX_SOAK=1 python -m pytest -s tests/test_faults.py
(docs/reliability.md). Every test prints a summary line of what it tried; with
ALEXNET_JAX_FAULT_REPORT=FILE they are also appended to FILE as JSON lines.
"""

import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import conftest

SOAK = bool(os.environ.get('ALEXNET_JAX_SOAK'))
KILLS = 50 if SOAK else 5
PREEMPTIONS = 20 if SOAK else 5
# 12 steps; checkpoints every 2 steps and after each evaluation (every 3): steps 2, 3, 4, 6, 8,
# 9, 10, 12; metrics logged every 2 steps, so a stop between logs must carry the unlogged steps.
RUN = dict(num_train_steps=12, checkpoint_every_steps=2, eval_every_steps=3, log_every_steps=2,
           keep_checkpoints=2)
SAVE_STEPS = (2, 3, 4, 6, 8, 9, 10, 12)
EVAL_STEPS = (3, 6, 9, 12)
# The line each phase starts with (absl log lines of alexnet_jax/core/train.py, checkpoints.py).
EVENTS = {
    'step': re.compile(r'\] step (\d+)/\d+ '),
    'save': re.compile(r'Saving the checkpoint of step (\d+) '),
    'eval': re.compile(r'Evaluating at step (\d+) '),
}
# How long after its line a kill may come: steps take ~0.1 s here, a background save ~0.05 s,
# an evaluation ~0.7 s.
DELAYS = {'step': 0.25, 'save': 0.08, 'eval': 0.8}
TIMING_KEYS = ('time', 'train/images_per_sec')  # differ between any two runs


def _command(workdir, **overrides):
  flags = {**RUN, **overrides}
  return [sys.executable, os.path.join(conftest.ROOT, 'main.py'), '--config=' + conftest.TINY,
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in flags.items()]


def _report(name, **facts):
  line = json.dumps({'test': name, **facts})
  print(line)
  if os.environ.get('ALEXNET_JAX_FAULT_REPORT'):
    with open(os.environ['ALEXNET_JAX_FAULT_REPORT'], 'a', encoding='utf-8') as f:
      f.write(line + '\n')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run: (final TrainState, metrics history without timings)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  conftest.train_tiny(workdir, **RUN)  # (in this process: the reruns' processes must match it)
  return _final(workdir)


def _final(workdir):
  from alexnet_jax.core import metrics  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config(**RUN)
  history = [{k: v for k, v in r.items() if k not in TIMING_KEYS}
             for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))]
  return conftest.latest_state(str(workdir), config), history


def _assert_same_run(workdir, reference):
  import jax  # pylint: disable=g-import-not-at-top
  state, history = _final(workdir)
  want_state, want_history = reference
  assert int(state.step) == int(want_state.step) == RUN['num_train_steps']
  # A save cut short leaves a temporary directory; the next start removes it.
  assert not [p for p in (pathlib.Path(workdir) / 'checkpoints').iterdir() if not p.name.isdigit()]
  leaves = jax.tree_util.tree_leaves_with_path
  got = {jax.tree_util.keystr(k): v for k, v in leaves(state)}
  want = {jax.tree_util.keystr(k): v for k, v in leaves(want_state)}
  assert got.keys() == want.keys()
  for key in want:  # bit for bit: parameters, momentum, step, RNG
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Every step's record once, in order, with the uninterrupted run's values.
  assert history == want_history


def _complete_steps(workdir):
  from alexnet_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.complete_steps(checkpoints.checkpoint_dir(str(workdir)))


def _interrupt(workdir, sig, phase, target, delay):
  """Runs the command until `phase`'s line for a step >= target, waits `delay` s and sends
  `sig`. Returns (exit status, whether the signal was sent, log text)."""
  with conftest.Processes() as group:  # (its stderr read as it comes, to time the signal)
    proc = group.start(_command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, sent = [], False
    for line in proc.stderr:
      lines.append(line)
      found = EVENTS[phase].search(line)
      if found and int(found.group(1)) >= target:
        time.sleep(delay)
        proc.send_signal(sig)
        sent = True
        break
    lines.extend(proc.stderr)  # (drains it: a SIGTERM'd run goes on to save and log)
    return group.wait_one(0, timeout=300), sent, ''.join(lines)


def _interruption_trials(tmp_path, reference, sig, trials, phases, seed):
  """`trials` interruptions by `sig` at random (phase, step, delay), each followed by a rerun of
  the same command; whenever a run reaches its end, the result is compared with `reference`
  and a new workdir starts. Returns the trials' records."""
  rng = random.Random(seed)
  records, chain, workdir = [], 0, None
  while len(records) < trials:
    if workdir is None:
      chain += 1
      workdir = tmp_path / f'chain{chain}'
    done = _complete_steps(workdir)
    start = done[-1] if done else 0
    # In the soak, a run with few points left to hit is finished, compared and begun anew (the
    # default suite's few kills do without the extra run).
    if SOAK and start >= RUN['num_train_steps'] - 4:
      conftest.run(_command(workdir), check=True)
      _assert_same_run(workdir, reference)
      workdir = None
      continue
    phase = rng.choice(phases)
    candidates = {'step': range(start + 1, RUN['num_train_steps'] + 1),
                  'save': [s for s in SAVE_STEPS if s > start],
                  'eval': [s for s in EVAL_STEPS if s > start]}[phase]
    target, delay = rng.choice(list(candidates)), rng.uniform(0, DELAYS[phase])
    status, sent, log = _interrupt(workdir, sig, phase, target, delay)
    assert sent, f'the run ended before {phase} {target}:\n{log[-3000:]}'
    if sig == signal.SIGTERM:
      assert status == 0, log[-3000:]
      assert 'Stopped at step' in log, log[-3000:]
    else:
      assert status == -signal.SIGKILL
    leftovers = [p.name for p in (workdir / 'checkpoints').iterdir() if not p.name.isdigit()] \
        if (workdir / 'checkpoints').is_dir() else []
    records.append({'phase': phase, 'step': target, 'delay_s': round(delay, 3),
                    'complete_checkpoints': _complete_steps(workdir),
                    'half_written': leftovers})
    if _complete_steps(workdir)[-1:] == [RUN['num_train_steps']]:  # killed after the last save
      _assert_same_run(workdir, reference)
      workdir = None
  # The last interruption's rerun, to the end (or, if the last kill came after the last save,
  # a new run), in a process that must write nowhere else.
  workdir = workdir or tmp_path / 'last'
  _run_writing_only_its_workdir(workdir, tmp_path / 'outside')
  _assert_same_run(workdir, reference)
  return records, chain


def _tree(root):
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob('*')
          if '__pycache__' not in p.parts}


def _run_writing_only_its_workdir(workdir, outside):
  """Runs the command with its own HOME, TMPDIR and current directory, and checks that it
  writes nowhere but `workdir` and the documented caches: those three stay empty, and the
  source checkout and /tmp gain or change nothing (Python's own __pycache__ aside)."""
  from alexnet_jax.cpu import onednn  # pylint: disable=g-import-not-at-top
  places = {name: outside / name for name in ('home', 'tmp', 'cwd')}
  for place in places.values():
    place.mkdir(parents=True)
  env = dict(os.environ, HOME=str(places['home']), TMPDIR=str(places['tmp']),
             ALEXNET_JAX_CACHE=onednn.cache_dir())  # (the documented caches: JAX's, ours)
  env.pop('KERAS_HOME', None)  # (the command sets it, into ours)
  shared_tmp = pathlib.Path('/tmp')
  checkout = pathlib.Path(conftest.ROOT)
  before = _tree(checkout), {p.name for p in shared_tmp.iterdir()}
  conftest.run(_command(workdir), check=True, cwd=places['cwd'], env=env)
  after = _tree(checkout), {p.name for p in shared_tmp.iterdir()}
  changed = {k for k in after[0] if before[0].get(k) != after[0][k]}
  assert not changed, f'the run wrote into the checkout: {sorted(changed)}'
  assert after[1] <= before[1], f'the run wrote into /tmp: {sorted(after[1] - before[1])}'
  for name, place in places.items():
    assert not list(place.iterdir()), f'the run wrote into its {name}: {list(place.rglob("*"))}'
  _report('nothing written outside the workdir', trials=1,
          outcome='HOME, TMPDIR, cwd, the checkout and /tmp unchanged')


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_equals_the_uninterrupted_run(tmp_path, reference):
  records, chains = _interruption_trials(tmp_path, reference, signal.SIGKILL, KILLS,
                                         ('step', 'save', 'eval'), seed=15)
  half = sum(bool(r['half_written']) for r in records)
  by_phase = {p: sum(r['phase'] == p for r in records) for p in EVENTS}
  _report('kill -9', trials=len(records), runs_compared=chains, by_phase=by_phase,
          left_half_written_checkpoint=half, outcome='final state and metrics bit-equal')


class _SignalAt:
  """A log handler that sends SIGTERM to this process when the training logs step >= target
  (as a scheduler's preemption notice would, at a moment the test picks)."""

  def __init__(self, target):
    import logging  # pylint: disable=g-import-not-at-top
    self.handler = logging.Handler()
    self.handler.emit = self._emit
    self.target, self.sent = target, False

  def _emit(self, record):
    found = EVENTS['step'].search('] ' + record.getMessage())
    if found and not self.sent and int(found.group(1)) >= self.target:
      self.sent = True
      os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_storm_then_restart_equals_the_uninterrupted_run(tmp_path, reference, caplog):
  """Preemptions in this process: the training's own SIGTERM handler stops it after the next
  step with a checkpoint; the same call again resumes. (kill -9 above runs real processes.)"""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top
  rng, workdir, stops, chains = random.Random(16), tmp_path / 'chain1', [], 1
  config = conftest.tiny_config(**RUN)
  # "step N" lines come every log_every_steps=2 steps; the run stops two steps after the signal
  # (the stop vote is read one step late, so that the device never waits), so up to step 8.
  last_target = RUN['num_train_steps'] - 4
  while len(stops) < PREEMPTIONS:
    done = _complete_steps(workdir)
    start = done[-1] if done else 0
    if start + 2 > last_target:  # this chain is done with: to the end, compare, start another
      train.train_and_evaluate(config, str(workdir))
      _assert_same_run(workdir, reference)
      chains += 1
      workdir, start = tmp_path / f'chain{chains}', 0
    target = rng.choice(range(start + 2, min(start + 4, last_target) + 1, 2))  # next 1-2 logs
    sender = _SignalAt(target)
    absl_logging.get_absl_logger().addHandler(sender.handler)
    caplog.clear()
    try:
      with caplog.at_level('INFO'):
        train.train_and_evaluate(config, str(workdir))
    finally:
      absl_logging.get_absl_logger().removeHandler(sender.handler)
    assert sender.sent
    stopped = [r.getMessage() for r in caplog.records if 'Stopped at step' in r.getMessage()]
    assert stopped, 'the run did not stop on SIGTERM'
    stops.append(target)
  train.train_and_evaluate(config, str(workdir))
  _assert_same_run(workdir, reference)
  _report('SIGTERM', trials=len(stops), runs_compared=chains, at_steps=stops,
          outcome='each stopped two steps later with a checkpoint; final state and '
          'metrics bit-equal')


def _damage(checkpoint, how):
  """Truncates the checkpoint's largest file to a tenth, or removes its JSON part's file."""
  if how == 'truncate':
    files = [p for p in checkpoint.rglob('*') if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 10)
  else:  # the JSON part's file
    (checkpoint / 'meta' / 'metadata').unlink()


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumes(tmp_path, reference,
                                                                   caplog, capfd):
  from alexnet_jax import errors  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top
  config = conftest.tiny_config(**RUN)
  conftest.train_tiny(tmp_path, **dict(RUN, num_train_steps=4))  # checkpoints of steps 3, 4
  done = _complete_steps(tmp_path)
  assert done[-2:] == [3, 4]
  _damage(tmp_path / 'checkpoints' / '4', 'truncate')
  capfd.readouterr()
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(config, str(tmp_path))
  warnings = ' '.join(r.getMessage() for r in caplog.records)
  assert f'The checkpoint of step 4 in {tmp_path}/checkpoints cannot be restored' in warnings
  assert ('Resuming from the checkpoint of step 3 instead of step 4: the run repeats 1 steps'
          in warnings)
  assert [p.name.split('-')[0] for p in (tmp_path / 'checkpoints_damaged').iterdir()] == ['4']
  assert 'Event loop is closed' not in capfd.readouterr().err  # (TensorStore's noise, filtered)
  _assert_same_run(tmp_path, reference)

  # A file removed from every checkpoint: the run stops; it never starts again from scratch.
  for step in _complete_steps(tmp_path):
    _damage(tmp_path / 'checkpoints' / str(step), 'remove')
  before = _snapshot(tmp_path)
  with pytest.raises(errors.RunError, match=r'No checkpoint in .* can be restored \(step 12: '):
    train.train_and_evaluate(config, str(tmp_path))
  assert _snapshot(tmp_path) == before
  _report('damaged checkpoint', trials=2, outcome='latest truncated: named, resumed from the '
          'previous one (1 step repeated), bit-equal; a file removed from all: stopped, nothing '
          'changed')


def _mount_tmpfs(path, megabytes):
  path.mkdir(parents=True, exist_ok=True)
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={megabytes}m', 'tmpfs', str(path)],
                        capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_it_and_the_same_command_resumes(tmp_path, reference):
  from alexnet_jax import errors  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top
  disk = tmp_path / 'disk'
  # A checkpoint of the tiny network is ~1.8 MB: 3 MB holds the first but not the second.
  if not _mount_tmpfs(disk, 3):
    pytest.skip('mounting a tmpfs needs root (CAP_SYS_ADMIN) here')
  try:
    workdir = disk / 'run'
    config = conftest.tiny_config(**RUN)
    with pytest.raises(errors.RunError) as failure:
      train.train_and_evaluate(config, str(workdir))
    message = str(failure.value)
    assert message.startswith(f'Writing a checkpoint to {workdir}/checkpoints failed: No space '
                              'left on device. The checkpoint of step 2 is intact'), message
    assert _complete_steps(workdir) == [2]
    state, _ = _final(workdir)  # the previous checkpoint restores
    assert int(state.step) == 2
    # Space freed: the same command resumes and ends as the uninterrupted run.
    subprocess.run(['mount', '-o', 'remount,size=64m', str(disk)], check=True)
    train.train_and_evaluate(config, str(workdir))
    _assert_same_run(workdir, reference)
  finally:
    subprocess.run(['umount', str(disk)], check=False)
  _report('full disk (3 MB tmpfs)', trials=1,
          outcome='stopped naming the path and cause; step 2 intact; resumed bit-equal')


# ---------------------------------------------------------------- in-process: configs, NaN


def _snapshot(workdir):
  """Every file of the run with its bytes (what 'nothing overwritten' compares)."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob('*'))
          if p.is_file()}


@pytest.mark.parametrize('field,value', [('model', 'small_one_column'), ('num_classes', 12),
                                         ('resize_size', 24)])
def test_a_resume_that_cannot_be_stops_naming_the_fields_and_changes_nothing(
    tmp_path, field, value):
  from alexnet_jax import errors  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top
  conftest.train_tiny(tmp_path, num_train_steps=2)
  before = _snapshot(tmp_path)
  changed = conftest.tiny_config(num_train_steps=4, **{field: value})
  with pytest.raises(errors.RunError, match=rf'Cannot resume .* in .*{field}: '):
    train.train_and_evaluate(changed, str(tmp_path))
  assert _snapshot(tmp_path) == before
  _report(f'resume with another {field}', trials=1, outcome='refused, naming it; nothing written')


@pytest.mark.slow
def test_safe_and_training_changes_on_resume_are_accepted_logged_and_recorded(tmp_path, caplog):
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top
  conftest.train_tiny(tmp_path, num_train_steps=2)
  changed = conftest.tiny_config(num_train_steps=3, eval_every_steps=3, log_every_steps=3,
                                 learning_rate=0.005)
  with caplog.at_level('INFO'):
    train.train_and_evaluate(changed, str(tmp_path))
  infos = [r.getMessage() for r in caplog.records if r.levelname == 'INFO']
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert 'Resuming with config.num_train_steps: 2 -> 3' in infos
  assert 'Resuming with config.eval_every_steps: 1000 -> 3' in infos
  assert any(w.startswith('Resuming with config.learning_rate: 0.01 -> 0.005 (a change to the '
                          'training') for w in warnings)
  assert int(conftest.latest_state(str(tmp_path), changed).step) == 3
  recorded = [json.loads(line) for line in
              (tmp_path / 'config_changes.jsonl').read_text().splitlines()]
  assert recorded[-1]['changes'] == {'learning_rate': [0.01, 0.005], 'eval_every_steps': [
      1000, 3], 'log_every_steps': [1, 3], 'num_train_steps': [2, 3]}
  _report('resume with safe changes', trials=1, outcome='accepted, logged, recorded')


class _Poisoned:
  """Wraps a Placement's train step: at `step` (1-based) it returns NaN in the loss or in the
  parameters (keeping the step's genuine loss)."""

  def __init__(self, train_step, step, where):
    self.train_step, self.step, self.where, self.calls = train_step, step, where, 0

  def __call__(self, state, *args):
    import jax  # pylint: disable=g-import-not-at-top
    state, metrics, votes = self.train_step(state, *args)
    self.calls += 1
    if self.calls == self.step:
      nan = lambda x: x * np.float32('nan')
      if self.where == 'loss':
        metrics = dict(metrics, **{'train/loss': nan(metrics['train/loss'])})
      else:
        params = jax.tree_util.tree_map(lambda x: x, state.params)
        params['fc7']['kernel'] = nan(params['fc7']['kernel'])
        state = state.replace(params=params)
    return state, metrics, votes


@pytest.mark.parametrize('where', ['loss', 'params'])
def test_nan_in_the_loss_or_the_parameters_stops_keeping_the_last_good_checkpoint(
    tmp_path, monkeypatch, where):
  from alexnet_jax import errors  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top

  class Placement(parallel.Placement):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.train_step = _Poisoned(self.train_step, 3, where)

  monkeypatch.setattr(train.parallel, 'Placement', Placement)
  config = conftest.tiny_config(num_train_steps=6, checkpoint_every_steps=1, eval_every_steps=1,
                                log_every_steps=1000)
  with pytest.raises(errors.TrainingDivergedError, match=r'step 3'):
    train.train_and_evaluate(config, str(tmp_path))
  assert _complete_steps(tmp_path)[-1] == 2
  state = conftest.latest_state(str(tmp_path), config)
  assert all(np.isfinite(x).all() for x in jax_leaves(state.params))
  records = metrics_lib.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records if 'eval/loss' in r] == [1, 2]
  assert not any(isinstance(v, str) for r in records for v in r.values())  # no 'nan'
  _report(f'NaN in the {where}', trials=1,
          outcome='stopped at step 3; step 2 stays latest; no NaN recorded')


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_leaves(tree)
