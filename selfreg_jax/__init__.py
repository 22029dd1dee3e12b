"""selfreg-jax: SelfReg-UNet (MICCAI 2024) in JAX/Flax."""
