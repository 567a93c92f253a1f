"""Properties of the repository itself, which the rest of the suite relies on."""

import warnings

import pytest


@pytest.mark.parametrize('module', ['alexnet_jax.core.steps', 'jax._src.api', 'flax.linen',
                                    'optax._src.base', 'orbax.checkpoint'])
def test_a_deprecation_in_the_stack_fails_the_suite(module):
  """pyproject.toml's filterwarnings: a DeprecationWarning raised for the package's code or
  inside JAX, Flax, Optax or Orbax is an error in every test."""
  scope = {'__name__': module, 'warnings': warnings}
  exec('def call():\n  warnings.warn("on its way out", DeprecationWarning)\n', scope)  # pylint: disable=exec-used
  with pytest.raises(DeprecationWarning, match='on its way out'):
    scope['call']()
