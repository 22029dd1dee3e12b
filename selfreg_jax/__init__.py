"""selfreg-jax: SelfReg-UNet (MICCAI 2024) in JAX/Flax."""

import jax

# Partitionable threefry makes XLA:CPU compile random-number code ~10x slower
# (measured: a jitted init of the tiny test UNet takes 30 s instead of 3 s).
# Our random draws are small (init, channel draws, stochastic-depth masks), so
# the classic scheme costs nothing at run time; its draws are still the same
# for every sharding.
jax.config.update('jax_threefry_partitionable', False)
