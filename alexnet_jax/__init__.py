"""alexnet_jax: a faithful, fast, functional JAX/Flax reimplementation of AlexNet (NIPS 2012)."""
