"""Properties of the repository itself, which the rest of the suite relies on: imports that
point one way, no private names used across modules, deprecations that fail the suite."""

import ast
import os
import warnings

import pytest

import conftest

PACKAGE = 'alexnet_jax'
# The layers, lowest first: a module imports only from its own layer or lower ones (and no
# module of its own layer that imports it back: `test_imports_have_no_cycles`).
LAYERS = (
    ('base', ('alexnet_jax.errors', 'alexnet_jax.paths', 'alexnet_jax.config',
              'alexnet_jax.distributed', 'alexnet_jax.progress', 'alexnet_jax.cli',
              'alexnet_jax.cpu')),
    ('data', ('alexnet_jax.data',)),
    ('core', ('alexnet_jax.core',)),
    ('commands', ('alexnet_jax.paper', 'alexnet_jax.bench', 'alexnet_jax.weights')),
)


def _modules() -> dict[str, str]:
  found = {}
  for folder, _, files in os.walk(os.path.join(conftest.ROOT, PACKAGE)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, conftest.ROOT)[:-3].replace(os.sep, '.')
        found[module.removesuffix('.__init__')] = path
  return found


def _imports(path: str, modules: dict[str, str]) -> dict[str, set[str]]:
  """The package's modules that `path` imports (at the top or inside functions), each with the
  names it reads from them."""
  out: dict[str, set[str]] = {}
  tree = ast.parse(open(path, encoding='utf-8').read())
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name in modules:
          out.setdefault(a.name, set())
          aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
      for a in node.names:
        full = f'{node.module}.{a.name}'
        if full in modules:  # `from alexnet_jax.core import steps`: a module
          out.setdefault(full, set())
          aliases[a.asname or a.name] = full
        else:  # `from alexnet_jax.core.steps import DATA`: a name of a module
          out.setdefault(node.module, set()).add(a.name)
  for node in ast.walk(tree):  # names read through a module's alias: `steps.DATA`
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases):
      out[aliases[node.value.id]].add(node.attr)
  return out


def _graph():
  modules = _modules()
  return modules, {m: _imports(p, modules) for m, p in modules.items()}


def _layer(module: str) -> int:
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + '.') for p in prefixes):
      return i
  raise AssertionError(f'{module} is in no layer of tests/test_repository.py')


def test_imports_have_no_cycles():
  modules, graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(module):
    state[module] = 1
    path.append(module)
    for other in graph[module]:
      if state.get(other) == 1:
        cycle = path[path.index(other):] + [other]
        raise AssertionError('import cycle: ' + ' -> '.join(cycle))
      if other not in state:
        visit(other)
    path.pop()
    state[module] = 2

  for module in sorted(modules):
    if module not in state:
      visit(module)


def test_imports_point_from_commands_to_core_to_data_to_base():
  _, graph = _graph()
  wrong = [f'{m} ({LAYERS[_layer(m)][0]}) imports {o} ({LAYERS[_layer(o)][0]})'
           for m, targets in graph.items() for o in targets
           if o != PACKAGE and _layer(o) > _layer(m)]
  assert not wrong, '\n'.join(wrong)


def test_no_module_uses_another_ones_private_names():
  _, graph = _graph()
  used = [f'{m} uses {o}.{name}' for m, targets in graph.items() for o, names in targets.items()
          for name in names if name.startswith('_') and not name.startswith('__')]
  assert not used, '\n'.join(used)


def test_the_checks_above_can_fail(tmp_path):
  """The import reader sees what the checks need: a function-level import and a private name."""
  source = tmp_path / 'x.py'
  source.write_text('def f():\n  from alexnet_jax.core import steps\n  return steps._hidden\n')
  modules = _modules()
  assert _imports(str(source), modules) == {'alexnet_jax.core.steps': {'_hidden'}}


@pytest.mark.parametrize('module', ['alexnet_jax.core.steps', 'jax._src.api', 'flax.linen',
                                    'optax._src.base', 'orbax.checkpoint'])
def test_a_deprecation_in_the_stack_fails_the_suite(module):
  """pyproject.toml's filterwarnings: a DeprecationWarning raised for the package's code or
  inside JAX, Flax, Optax or Orbax is an error in every test."""
  scope = {'__name__': module, 'warnings': warnings}
  exec('def call():\n  warnings.warn("on its way out", DeprecationWarning)\n', scope)  # pylint: disable=exec-used
  with pytest.raises(DeprecationWarning, match='on its way out'):
    scope['call']()


def _documented_commands() -> list[str]:
  import re  # pylint: disable=g-import-not-at-top
  found = set()
  for name in ['README.md', 'BENCHMARKS.md'] + [
      os.path.join('docs', f) for f in os.listdir(os.path.join(conftest.ROOT, 'docs'))
      if f.endswith('.md')]:
    with open(os.path.join(conftest.ROOT, name), encoding='utf-8') as f:
      found.update(re.findall(r'python -m (alexnet_jax(?:\.\w+)+)', f.read()))
  return sorted(found)


def test_every_documented_command_exists():
  import importlib.util  # pylint: disable=g-import-not-at-top
  commands = _documented_commands()
  assert 'alexnet_jax.bench.scaling' in commands  # the reader finds them
  missing = [c for c in commands if importlib.util.find_spec(c) is None]
  assert not missing, f'documented but not in the package: {missing}'


@pytest.mark.slow
def test_every_documented_command_answers_help():
  commands = [['-m', c] for c in _documented_commands()] + [['main.py']]
  # One after another in one interpreter (conftest.run_commands), as `python -m` runs each.
  results = conftest.run_commands([([*c, '--help'], conftest.ROOT) for c in commands])
  for c, p in zip(commands, results):
    assert p.returncode == 0 and '--' in p.stdout + p.stderr, (c, p.returncode,
                                                               p.stderr[-2000:])


def test_no_function_imports_what_its_module_already_imported():
  modules = _modules()
  repeated = []
  for module, path in sorted(modules.items()):
    tree = ast.parse(open(path, encoding='utf-8').read())
    top = {(getattr(n, 'module', None), a.name, a.asname) for n in tree.body
           if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in tree.body:
        repeated += [f'{module}:{node.lineno} {a.name}' for a in node.names
                     if (getattr(node, 'module', None), a.name, a.asname) in top]
  assert not repeated, '\n'.join(repeated)
