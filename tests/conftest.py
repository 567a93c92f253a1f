"""Test set-up: simulate 8 CPU devices (for the pmap tests) before JAX starts; shared fixtures
and helpers: the checkout's paths, configs, and running commands in subprocesses.

Test files import the helpers as `import conftest` (tests/ is on sys.path: pytest's 'prepend'
import mode).
"""

import json
from importlib import metadata
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
_OPTIMISATION_FLAG = '--xla_backend_optimization_level'
_FUSION_EMITTERS_FLAG = '--xla_cpu_use_fusion_emitters'


def _xla_knows_fusion_emitters_flag() -> bool:
  """Whether the installed XLA:CPU takes _FUSION_EMITTERS_FLAG: jaxlib 0.10 does. XLA is retiring
  the older emitters that the flag selects, and an XLA that does not know a flag of XLA_FLAGS
  stops at its first computation ('Unknown flags in XLA_FLAGS'), so other versions go without."""
  try:
    return metadata.version('jaxlib').split('.')[:2] == ['0', '10']
  except metadata.PackageNotFoundError:
    return False


# 8 simulated CPU devices, and compiling made cheap, since compiling is a large share of the
# suite's time and the checks compare values, not speed:
# - XLA's backend (LLVM) optimisations off (a cold 12-step run of configs/tiny.py: 25 CPU s
#   against 15); the convolutions run the same library calls at either level.
# - The elementwise parts (fusions) compiled by XLA:CPU's older emitters instead of its MLIR
#   fusion emitters: the tiny network's pmapped train step compiles in 0.74 CPU s against 2.5-2.8,
#   the paper network's in 0.6-0.9 against 2.3-2.8, and the whole suite ran in 322 s against 360
#   (593 CPU s against 680), same machine, back to back, every test passing.
os.environ.setdefault('XLA_FLAGS', ' '.join(
    [f'{_DEVICE_COUNT_FLAG}=8', f'{_OPTIMISATION_FLAG}=0'] +
    [f'{_FUSION_EMITTERS_FLAG}=false'] * _xla_knows_fusion_emitters_flag()))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compiled programs are cached across tests and the main.py subprocesses they start: the same
# tiny network is compiled by many tests.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'alexnet_jax_test_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Every other temporary file of the tests, and of the commands they start, goes into one folder
# of /tmp: test_faults.py checks that a run writes nothing into /tmp itself, and tests running
# beside it (`pytest -n 2`) must not make new entries there.
_TMP = os.path.join(tempfile.gettempdir(), 'alexnet_jax_tests')
os.makedirs(_TMP, exist_ok=True)
os.environ['TMPDIR'] = tempfile.tempdir = _TMP


import pytest  # pylint: disable=g-import-not-at-top  (after the environment above)

from alexnet_jax import cli  # pylint: disable=g-import-not-at-top

cli.quiet_tensorflow_logs()  # As every command starts: TensorFlow without Keras.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
TINY = os.path.join(ROOT, 'configs', 'tiny.py')
LOG = 'log file'  # Processes.start: the stream goes to a log file of the group's
_TAIL = 3000  # characters of a command's output that a failure message quotes


# ---------------------------------------------------------------- configs


def config(name, /, **overrides):
  """configs/NAME.py's get_config() with `overrides` applied (config.update)."""
  import importlib  # pylint: disable=g-import-not-at-top
  result = importlib.import_module(f'configs.{name}').get_config()
  result.update(overrides)
  return result


def tiny_config(**overrides):
  """configs/tiny.py (the small network on 16x16 digits, 4 steps) with `overrides` applied."""
  return config('tiny', **overrides)


def train_tiny(path, **overrides) -> str:
  """Trains configs/tiny.py (16x16 digits) with `overrides` into `path`; returns the workdir."""
  from alexnet_jax.core import train  # pylint: disable=g-import-not-at-top  (JAX after XLA_FLAGS)
  train.train_and_evaluate(tiny_config(**overrides), str(path))
  return str(path)


def latest_state(workdir, config):  # pylint: disable=redefined-outer-name
  """The TrainState of the latest checkpoint in `workdir` (a run of `config`), host arrays."""
  from alexnet_jax.core import checkpoints  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import optim  # pylint: disable=g-import-not-at-top
  from alexnet_jax.core import steps  # pylint: disable=g-import-not-at-top
  manager = checkpoints.create_manager(workdir, config.keep_checkpoints, read_only=True)
  _, _, shapes = steps.initial_state(config, abstract=True)
  restored = checkpoints.restore(manager, shapes, optim.LearningRate(config, 10).state())
  manager.close()
  return restored[0]


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory):
  """A trained tiny run (4 steps) with its checkpoint, classes and statistics, trained once for
  test_evaluate.py, test_predict.py and test_figures.py."""
  return train_tiny(tmp_path_factory.mktemp('tiny_run'), num_train_steps=4)


# ---------------------------------------------------------------- subprocesses


def _env_with_xla_flags(leave_out: str, *add: str) -> dict[str, str]:
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(leave_out)]
  return dict(os.environ, XLA_FLAGS=' '.join([*flags, *add]))


def env_with_devices(devices: int) -> dict[str, str]:
  """This environment with `devices` simulated CPU devices instead of 8 (XLA's other flags
  kept), for a command started as a subprocess."""
  return _env_with_xla_flags(_DEVICE_COUNT_FLAG, f'{_DEVICE_COUNT_FLAG}={devices}')


def env_optimised() -> dict[str, str]:
  """This environment with XLA's backend optimisations at their default (XLA's other flags
  kept: the older fusion emitters' programs ran the ReLU/tanh sweep as fast), for a command
  whose time is in running its programs, not in compiling them."""
  return _env_with_xla_flags(_OPTIMISATION_FLAG)


def free_port() -> int:
  """A TCP port of 127.0.0.1 that the OS says is free (for a coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
  """SIGKILL to `proc`'s process group (its session's), if `proc` is still running: while it is
  not reaped its id cannot name another process group."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # (ended in between)
      pass


def _tail(*texts) -> str:
  """The end of each (name, text) that is not empty, under its name."""
  return '\n'.join(f'--- {name} ---\n{text[-_TAIL:]}' for name, text in texts
                   if text) or '(no output)'


def run(args, *, cwd=ROOT, env=None, timeout=300, check=False, stderr=subprocess.PIPE):
  """Runs the command `args` (a list) to its end in a session of its own, its output captured
  as text, and returns the subprocess.CompletedProcess (as subprocess.run with
  capture_output=True, text=True).

  Past `timeout` seconds the whole process group is killed (the command and whatever it
  started), its output printed (pytest shows it with the failure) and an AssertionError names the
  command with the end of its output. check=True: a non-zero exit raises CalledProcessError, with
  the end of the output attached. stderr=subprocess.STDOUT: both streams in `stdout`, in the
  order they were written. `cwd=None` is the current directory.
  """
  with subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr,
                        text=True, start_new_session=True) as proc:
    try:
      stdout, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      _kill_group(proc)
      try:
        stdout, err = proc.communicate(timeout=30)  # what it wrote until then
      except subprocess.TimeoutExpired:  # (a process outside the group holds the pipes)
        stdout, err = '', ''
      print(stdout or '', err or '', sep='\n')
      raise AssertionError(
          f'{shlex.join(map(str, args))} ran past {timeout} s and was killed; the end of its '
          f'output:\n{_tail(("stdout", stdout or ""), ("stderr", err or ""))}') from None
    except BaseException:  # (KeyboardInterrupt: nothing left behind)
      _kill_group(proc)
      raise
  result = subprocess.CompletedProcess(args, proc.returncode, stdout, err)
  if check and result.returncode:
    error = subprocess.CalledProcessError(result.returncode, args, stdout, err)
    error.add_note(_tail(('stdout', stdout or ''), ('stderr', err or '')))
    raise error
  return result


def run_commands(cases, *, timeout=300) -> list[subprocess.CompletedProcess]:
  """Runs the commands `cases`, [(argv after `python`, cwd)], one after another in one
  interpreter (tests/commands_worker.py: each as __main__, its flags removed after it), and
  returns a CompletedProcess per case with its exit status and its stdout and stderr (text).
  For commands that stop early (--help, a user error): each saves the ~4 s of importing
  TensorFlow and JAX that a `python` of its own would spend first."""
  folder = tempfile.mkdtemp(prefix='commands_')
  try:
    cases_path, report_path = (os.path.join(folder, f) for f in ('cases.json', 'report.json'))
    with open(cases_path, 'w', encoding='utf-8') as f:
      json.dump([{'argv': [str(a) for a in argv], 'cwd': str(cwd)} for argv, cwd in cases], f)
    run([sys.executable, os.path.join(ROOT, 'tests', 'commands_worker.py'), cases_path,
         report_path], timeout=timeout, check=True)
    with open(report_path, encoding='utf-8') as f:
      report = json.load(f)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  return [subprocess.CompletedProcess(argv, r['returncode'], r['stdout'], r['stderr'])
          for (argv, _), r in zip(cases, report)]


class Processes:
  """Commands started together in the background: the processes of a multi-process run, or
  several commands at once. Each runs in a session (process group) of its own; on the way out of
  the `with` block whatever still runs gets SIGKILL, process group and all, and is waited for.

    with conftest.Processes() as group:
      for i in range(2):
        group.start([sys.executable, 'main.py', f'--process_id={i}', ...])
      codes = group.wait(timeout=240)
      assert codes == [0, 0], group.output(1)[-3000:]

  By default a process's stdout and stderr go together to a log file, read with `output(i)` at
  any time, also after the block (stderr=LOG: a log of its own, `errors(i)`). Logs are written
  into `log_dir` and kept there, or else into a temporary folder removed on the way out (their
  text is read first). Any other stdout/stderr is Popen's own: subprocess.PIPE, to read the
  output as it comes through `procs[i]`, or subprocess.DEVNULL.
  """

  def __init__(self, log_dir=None):
    self.procs: list[subprocess.Popen] = []
    self._log_dir = None if log_dir is None else str(log_dir)
    self._own_dir = None  # the temporary folder of the logs, when no log_dir was given
    self._logs: list[dict[str, str]] = []  # per process: {'stdout' or 'stderr': path}
    self._texts: dict[str, str] = {}  # logs read on the way out of a temporary folder

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for proc in self.procs:
      _kill_group(proc)
    for proc in self.procs:
      proc.wait()
      for pipe in (proc.stdout, proc.stderr):
        if pipe:
          pipe.close()
    if self._own_dir:
      for logs in self._logs:
        for path in logs.values():
          self._texts[path] = self._read_file(path)
      shutil.rmtree(self._own_dir, ignore_errors=True)
    return False

  def start(self, args, *, cwd=ROOT, env=None, stdout=LOG, stderr=subprocess.STDOUT,
            name='process') -> subprocess.Popen:
    """Starts the command `args` (a list) in a session of its own; returns its Popen (also
    `procs[i]`, i its index in the group). Its log files are called NAME_I_*.log. `cwd=None` is
    the current directory."""
    i = len(self.procs)
    logs, files = {}, {}
    try:
      for stream, where in (('stdout', stdout), ('stderr', stderr)):
        if where == LOG:
          suffix = '' if stream == 'stdout' else '_stderr'
          logs[stream] = os.path.join(self._folder(), f'{name}_{i}_{time.time_ns()}{suffix}.log')
          files[stream] = open(logs[stream], 'w', encoding='utf-8')  # pylint: disable=R1732
        else:
          files[stream] = where
      proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=files['stdout'],
                              stderr=files['stderr'], text=True, start_new_session=True)
    finally:
      for stream in logs:
        files[stream].close()  # (the process has its own)
    self.procs.append(proc)
    self._logs.append(logs)
    return proc

  def output(self, i: int) -> str:
    """What process `i` has written so far to its stdout log (and stderr, unless logged
    apart)."""
    return self._read(i, 'stdout')

  def errors(self, i: int) -> str:
    """What process `i` has written so far to its stderr log (started with stderr=LOG)."""
    return self._read(i, 'stderr')

  def kill(self, i: int) -> None:
    """SIGKILL to process `i`'s process group, if it is still running."""
    _kill_group(self.procs[i])

  def wait(self, timeout=300) -> list[int]:
    """Waits for every process to end, all within `timeout` seconds (each gets at least 1 s);
    returns their exit statuses. One still running past that: AssertionError naming it."""
    deadline = time.time() + timeout
    return [self._wait(i, max(deadline - time.time(), 1), timeout)
            for i in range(len(self.procs))]

  def wait_one(self, i: int, timeout=300) -> int:
    """Waits up to `timeout` seconds for process `i` to end; returns its exit status. Still
    running past that: AssertionError naming it."""
    return self._wait(i, timeout, timeout)

  def wait_for(self, i: int, text: str, timeout=300) -> None:
    """Waits until process `i`'s output log holds `text`: AssertionError if it ends first or
    none comes within `timeout` seconds."""
    deadline = time.time() + timeout
    while text not in self.output(i):
      assert time.time() < deadline, (
          f'no {text!r} in process {i}\'s log:\n{self.output(i)[-_TAIL:]}')
      assert self.procs[i].poll() is None, f'process {i} ended:\n{self.output(i)[-_TAIL:]}'
      time.sleep(0.5)

  def _wait(self, i, seconds, timeout) -> int:
    proc = self.procs[i]
    try:
      return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
      logs = [(stream, self._read(i, stream)) for stream in self._logs[i]]
      raise AssertionError(
          f'process {i}, {shlex.join(map(str, proc.args))}, ran past {timeout} s; the end of its '
          f'output:\n{_tail(*logs) if logs else "(not logged)"}') from None

  def _folder(self) -> str:
    if self._log_dir is None:
      self._own_dir = self._log_dir = tempfile.mkdtemp(prefix='processes_')
    return self._log_dir

  def _read(self, i, stream) -> str:
    path = self._logs[i].get(stream)
    if path is None:
      raise ValueError(f'process {i}\'s {stream} is not logged')
    return self._texts[path] if path in self._texts else self._read_file(path)

  @staticmethod
  def _read_file(path) -> str:
    with open(path, encoding='utf-8', errors='replace') as f:
      return f.read()
