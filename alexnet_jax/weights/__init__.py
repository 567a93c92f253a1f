"""Trained weights in and out of a run directory: import torchvision's AlexNet (`import_weights`)
and export a run for serving (`export`). Starting a run from another run's parameters is
config.init_from (alexnet_jax/core/transfer.py)."""
