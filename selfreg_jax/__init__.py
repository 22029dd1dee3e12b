"""selfreg-jax: SelfReg-UNet (MICCAI 2024) in JAX/Flax."""

import os

import jax

# Partitionable threefry makes XLA:CPU compile random-number code ~10x slower
# (measured: a jitted init of the tiny test UNet takes 30 s instead of 3 s).
# Our random draws are small (init, channel draws, stochastic-depth masks), so
# the classic scheme costs nothing at run time; its draws are still the same
# for every sharding.
jax.config.update('jax_threefry_partitionable', False)

# TensorFlow, which CLU's summary writers import to write event files, prints
# a notice about its oneDNN kernels (two lines on stderr, before anything of
# ours) when it loads, unless they are off; it computes nothing for us.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
