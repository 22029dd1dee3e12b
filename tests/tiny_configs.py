"""Tiny model configurations shared by the tests (all sizes live here)."""

import ml_collections

# Image sizes every tiny model must handle (Swin: divisible by patch*2**3 and
# every stage tileable by the window).
IMAGE_SIZES = (32, 64)
BATCH = 2
NUM_CLASSES = 4


def tiny_unet() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='unet', num_classes=NUM_CLASSES, in_channels=1,
      widths=(8, 16, 32, 64, 128)))


def tiny_swin(image_size: int = IMAGE_SIZES[0],
              num_stages: int = 4) -> ml_collections.ConfigDict:
  """A tiny Swin-UNet; every stage has a plain and a shifted-window block.

  Fewer stages compile faster (XLA:CPU compile time grows with the number of
  blocks); the architecture tests use the paper's four.
  """
  return ml_collections.ConfigDict(dict(
      name='swin_unet', num_classes=NUM_CLASSES, in_channels=1,
      image_size=image_size, patch_size=2, embed_dim=8,
      depths=(2,) * num_stages, num_heads=(1, 2, 2, 4)[:num_stages],
      window_size=4, drop_path_rate=0.1))


def full_unet() -> ml_collections.ConfigDict:
  """The paper's UNet: 1 input channel, 9 Synapse classes."""
  return ml_collections.ConfigDict(dict(name='unet', num_classes=9,
                                        in_channels=1))


def full_swin() -> ml_collections.ConfigDict:
  """The paper's Swin-UNet (tiny setting) at 224, 9 Synapse classes."""
  return ml_collections.ConfigDict(dict(name='swin_unet', num_classes=9,
                                        image_size=224))

# Parameter counts of the PyTorch reference models (docs/design.md section 1).
FULL_UNET_PARAMS = 17_262_345
FULL_SWIN_PARAMS = 27_168_900


def init_variables(model, image_size: int, channels: int = 1, batch: int = BATCH):
  """Variables of `model` for (batch, S, S, channels) inputs (jit-compiled:
  eager init of many small random draws is slow on XLA:CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((batch, image_size, image_size, channels))
  return jax.jit(model.init)({'params': jax.random.key(0),
                              'dropout': jax.random.key(1)}, x)
