"""The CNN UNet of SelfReg-UNet: the classic "Pytorch-UNet" layout, bilinear.

inc -> down1..down4 (2x2 max-pool, DoubleConv) -> up1..up4 (bilinear x2 with
align_corners=True, pad to the skip, concat [skip, upsampled], DoubleConv) ->
outc (1x1 conv with bias). With widths (64, 128, 256, 512, 1024), 1 input
channel and 9 classes it has 17,262,345 parameters, like the PyTorch model.
Any input of at least MIN_IMAGE_SIZE pixels a side works: the max-pools round
down and each Up pads back to its skip's size.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from selfreg_jax.core.models.batch_norm import BatchNorm
from selfreg_jax.core.models.fast_gradients import Conv, max_pool_2x2
from selfreg_jax.core.models.features import Features

# The down stages' 2x2 max-pools (rounding down) must leave the bottleneck at
# least one pixel: inputs need MIN_IMAGE_SIZE pixels a side.
NUM_POOLS = 4
MIN_IMAGE_SIZE = 2 ** NUM_POOLS

# PyTorch's default conv init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def align_corners_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Linear interpolation weights (size_out, size_in), align_corners=True."""
  weights = np.zeros((size_out, size_in), np.float32)
  if size_in == 1 or size_out == 1:
    weights[:, 0] = 1.0
    return weights
  position = np.arange(size_out) * (size_in - 1) / (size_out - 1)
  lower = np.minimum(np.floor(position).astype(int), size_in - 2)
  fraction = (position - lower).astype(np.float32)
  rows = np.arange(size_out)
  weights[rows, lower] += 1 - fraction
  weights[rows, lower + 1] += fraction
  return weights


def upsample_bilinear_x2(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, 2H, 2W, C), bilinear with align_corners=True."""
  _, height, width, _ = x.shape
  rows = jnp.asarray(align_corners_matrix(height, 2 * height), x.dtype)
  cols = jnp.asarray(align_corners_matrix(width, 2 * width), x.dtype)
  x = jnp.einsum('oh,bhwc->bowc', rows, x)
  return jnp.einsum('pw,bhwc->bhpc', cols, x)


class DoubleConv(nn.Module):
  """(3x3 conv without bias, BatchNorm (PyTorch semantics), ReLU) x 2."""
  features: int
  mid_features: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for width in (self.mid_features or self.features, self.features):
      x = Conv(width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
               kernel_init=torch_conv_init)(x)
      x = BatchNorm(dtype=self.dtype)(x, train)
      x = nn.relu(x)
    return x


class Down(nn.Module):
  """2x2 max-pool, then DoubleConv."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = max_pool_2x2(x)
    return DoubleConv(self.features, dtype=self.dtype)(x, train)


class Up(nn.Module):
  """Bilinear x2, pad to the skip's size, concat [skip, up], DoubleConv."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
    x = upsample_bilinear_x2(x)
    pad_h = skip.shape[1] - x.shape[1]
    pad_w = skip.shape[2] - x.shape[2]
    x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                    (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    x = jnp.concatenate([skip, x], axis=-1)
    return DoubleConv(self.features, x.shape[-1] // 2, dtype=self.dtype)(
        x, train)


class UNet(nn.Module):
  """CNN UNet returning (logits, Features).

  Attributes:
    num_classes: output channels.
    in_channels: expected input channels (checked at call time).
    widths: channels of inc, down1, down2, down3 and the (pre-halving) width of
      down4; with bilinear upsampling down4 and the decoder use half of it.
    dtype: computation dtype (parameters stay float32).
  """
  num_classes: int
  in_channels: int = 1
  widths: Sequence[int] = (64, 128, 256, 512, 1024)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """x: (B, H, W, in_channels) -> logits (B, H, W, num_classes), Features.

    Taps: encoder = down1..down4 outputs (H/2..H/16), decoder = up1..up3
    outputs (H/8, H/4, H/2), final = up4 output (H, W, widths[0]).
    """
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f'UNet expects (B, H, W, {self.in_channels}) input, '
                       f'got shape {x.shape}.')
    if len(self.widths) != 5:
      raise ValueError(f'UNet widths must have 5 entries, got {self.widths}.')
    w = self.widths
    x = x.astype(self.dtype)
    skips = [DoubleConv(w[0], dtype=self.dtype, name='inc')(x, train)]
    for i, width in enumerate((w[1], w[2], w[3], w[4] // 2)):
      skips.append(Down(width, dtype=self.dtype, name=f'down{i + 1}')(
          skips[-1], train))
    encoder = tuple(skips[1:])
    x = skips.pop()
    decoder = []
    for i, width in enumerate((w[3] // 2, w[2] // 2, w[1] // 2, w[0])):
      x = Up(width, dtype=self.dtype, name=f'up{i + 1}')(x, skips.pop(), train)
      decoder.append(x)
    logits = Conv(self.num_classes, (1, 1), dtype=self.dtype,
                  kernel_init=torch_conv_init, name='outc')(x)
    features = Features(encoder=encoder, decoder=tuple(decoder[:3]),
                        final=decoder[3])
    return logits, features
