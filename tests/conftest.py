"""Test set-up: simulate 8 CPU devices (for the pmap tests) before JAX starts."""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The repository root, so that `configs` and `alexnet_jax` import without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
