"""A test worker: runs several commands one after another in this one interpreter, each as
`python -m MODULE ARGS` or `python SCRIPT ARGS` would run it (as `__main__`, with its argv, from
its directory), and reports what each wrote and how it ended.

  python tests/commands_worker.py CASES_JSON REPORT_JSON

CASES_JSON: [{'argv': ['-m', 'alexnet_jax.paper.evaluate', '--workdirs=...'] or
['main.py', ...], 'cwd': DIR}, ...]. REPORT_JSON gets, per case, {'returncode', 'stdout',
'stderr'}: the exit status as the interpreter would give it (sys.exit's code; 1 and the traceback
on stderr for an exception that escaped), and the two streams as written to the file
descriptors (Python's, absl's logging and TensorFlow's C++ lines alike).

Why one interpreter: these cases are starts and early exits (--help, a user error), and each
`python` of a command spends ~4 s of CPU importing TensorFlow and JAX before it gets there;
tests/test_cli.py and test_repository.py have 28 such cases. Between cases the flags the command
defined are removed, so that the next command defines its own (every command defines its flags
only when run, `cli.run`). The first case runs in a fresh interpreter; the others find the
libraries already imported, which is the point.
"""

import contextlib
import json
import os
import runpy
import sys
import tempfile
import traceback
import warnings

from absl import app
from absl import flags


@contextlib.contextmanager
def _captured(fd: int, sink):
  """Points file descriptor `fd` at the file `sink` for the block (and Python's stream on it
  flushed before and after)."""
  stream = {1: sys.stdout, 2: sys.stderr}[fd]
  stream.flush()
  saved = os.dup(fd)
  os.dup2(sink.fileno(), fd)
  try:
    yield
  finally:
    stream.flush()
    os.dup2(saved, fd)
    os.close(saved)


def _run(argv: list[str]) -> int:
  """Runs the command `argv` (as after `python`) as __main__; returns its exit status."""
  try:
    if argv[0] == '-m':
      sys.argv = [argv[1], *argv[2:]]
      runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
    else:
      sys.argv = list(argv)
      runpy.run_path(argv[0], run_name='__main__')
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)  # as the interpreter prints sys.exit('message')
    return 1
  except BaseException:  # pylint: disable=broad-except  (as the interpreter reports it)
    traceback.print_exc()
    return 1
  return 0


def main(cases_path: str, report_path: str) -> None:
  with open(cases_path, encoding='utf-8') as f:
    cases = json.load(f)
  # runpy warns when a module was imported (by an earlier command) before it runs as __main__.
  warnings.filterwarnings('ignore', message='.*found in sys.modules', category=RuntimeWarning)
  app.define_help_flags()  # (app.run defines them once per interpreter: kept for every case)
  baseline = set(flags.FLAGS)
  report = []
  for case in cases:
    os.chdir(case['cwd'])
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
      with _captured(1, out), _captured(2, err):
        code = _run(case['argv'])
      out.seek(0)
      err.seek(0)
      report.append({'returncode': code, 'stdout': out.read(), 'stderr': err.read()})
    for name in set(flags.FLAGS) - baseline:  # the command's own flags
      delattr(flags.FLAGS, name)
  with open(report_path, 'w', encoding='utf-8') as f:
    json.dump(report, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
