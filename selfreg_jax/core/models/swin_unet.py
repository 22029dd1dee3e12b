"""Swin-UNet (SwinTransformerSys, "tiny" setting) returning SelfReg taps.

Patch embed (4x4 conv -> 96, LayerNorm); 4 encoder stages of Swin blocks with
(shifted) window attention and PatchMerging between them; LayerNorm after the
bottleneck; a mirrored decoder (PatchExpand of the bottleneck, then for each
stage: concat the skip, Linear back to the stage width, Swin blocks,
PatchExpand); LayerNorm, a x4 FinalPatchExpand and a 1x1 conv to the classes.
All maps are kept NHWC; module names follow the PyTorch model so checkpoints
map one to one. With the defaults and 9 classes it has 27,168,900 parameters.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from selfreg_jax.core.models.fast_gradients import Conv, matrix_dot_general
from selfreg_jax.core.models.features import Features
from selfreg_jax.core.models.unet import torch_conv_init

dense_init = nn.initializers.truncated_normal(0.02)


def _untileable_stage(image_size: int, patch_size: int, num_stages: int,
                      window_size: int) -> int | None:
  """The first stage whose resolution the windows cannot tile, else None."""
  for stage in range(num_stages):
    resolution = image_size // patch_size // 2 ** stage
    if resolution > window_size and resolution % window_size:
      return stage
  return None


def stage_windows(image_size: int, patch_size: int, num_stages: int,
                  window_size: int) -> list[tuple[int, int, int]]:
  """Per stage (resolution, window, shift); fails clearly on untileable sizes.

  A stage whose resolution is no larger than the window uses one window of the
  whole map and never shifts (as in the reference Swin code).
  """
  reduction = patch_size * 2 ** (num_stages - 1)
  stage = _untileable_stage(image_size, patch_size, num_stages, window_size)
  if image_size % reduction or stage is not None:
    valid = [size for size in range(reduction, 4 * image_size, reduction)
             if _untileable_stage(size, patch_size, num_stages,
                                  window_size) is None]
    raise ValueError(
        f'Swin-UNet image_size={image_size} cannot be tiled: it must be '
        f'divisible by patch_size * 2**(stages - 1) = {reduction}, and every '
        f'stage resolution must be <= window_size={window_size} or a multiple '
        f'of it. Sizes that work include {valid[:6]}.')
  windows = []
  for stage in range(num_stages):
    resolution = image_size // patch_size // 2 ** stage
    if resolution <= window_size:
      windows.append((resolution, resolution, 0))
    else:
      windows.append((resolution, window_size, window_size // 2))
  return windows


def relative_position_index(window: int) -> np.ndarray:
  """(N, N) index into the ((2w-1)^2, heads) bias table, N = w*w."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window),
                                indexing='ij')).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]) + window - 1
  return relative[0] * (2 * window - 1) + relative[1]


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """(nW, nW, N, N) additive mask: -100 between tokens of different regions."""
  regions = np.zeros((resolution, resolution), np.int32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, rows in enumerate(bounds):
    for j, cols in enumerate(bounds):
      regions[rows, cols] = 3 * i + j
  windows = partition_windows(regions[None, :, :, None], window)[0, ..., 0]
  same = windows[..., :, None] == windows[..., None, :]
  return np.where(same, 0.0, -100.0).astype(np.float32)


def partition_windows(x, window: int):
  """(B, H, W, C) -> (B, H/w, W/w, w*w, C); works on NumPy and JAX arrays."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(
      b, h // window, w // window, window * window, c)


def merge_windows(x, window: int):
  """(B, nH, nW, w*w, C) -> (B, nH*w, nW*w, C)."""
  b, nh, nw, _, c = x.shape
  x = x.reshape(b, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, nh * window, nw * window, c)


class DropPath(nn.Module):
  """Stochastic depth: drops whole samples' residual branch in training.

  Sample i is kept with the draw of the module's key folded with i, a
  computation per sample: with the batch split over devices, each device
  draws its own samples' masks. (One draw of B values would not split: the
  classic threefry scheme, which the entry points select (runtime.py), mixes
  counters across the batch, and a sharded step then gathers and permutes
  them between devices.)
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    key = self.make_rng('dropout')
    kept = jax.vmap(lambda i: jax.random.bernoulli(
        jax.random.fold_in(key, i), keep))(jnp.arange(x.shape[0]))
    mask = kept.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)


def dense(features, dtype, use_bias=True, name=None):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=dense_init, dot_general=matrix_dot_general,
                  name=name)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with relative position bias."""
  dim: int
  num_heads: int
  window: int
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: np.ndarray | None,
               train: bool) -> jax.Array:
    """x: (B, nH, nW, N, C); mask: (nH, nW, N, N) or None."""
    head_dim = self.dim // self.num_heads
    # A split (not indexing): its gradient is one concatenation, where the
    # gradients of three index slices are three padded copies summed.
    q, k, v = (t.reshape(x.shape[:-1] + (self.num_heads, head_dim))
               for t in jnp.split(dense(3 * self.dim, self.dtype,
                                        name='qkv')(x), 3, axis=-1))
    logits = jnp.einsum('bxyqhd,bxykhd->bxyhqk', q * head_dim ** -0.5, k)
    table = self.param('relative_position_bias_table', dense_init,
                       ((2 * self.window - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(self.window)].transpose(2, 0, 1)
    logits = logits.astype(jnp.float32) + bias
    if mask is not None:
      logits = logits + mask[:, :, None]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.attn_drop, deterministic=not train)(weights)
    out = jnp.einsum('bxyhqk,bxykhd->bxyqhd', weights, v)
    out = dense(self.dim, self.dtype, name='proj')(
        out.reshape(x.shape[:-1] + (self.dim,)))
    return nn.Dropout(self.proj_drop, deterministic=not train)(out)


class Mlp(nn.Module):
  hidden: int
  drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dim = x.shape[-1]
    x = nn.gelu(dense(self.hidden, self.dtype, name='fc1')(x),
                approximate=False)
    x = nn.Dropout(self.drop, deterministic=not train)(x)
    x = dense(dim, self.dtype, name='fc2')(x)
    return nn.Dropout(self.drop, deterministic=not train)(x)


class SwinBlock(nn.Module):
  """One Swin Transformer block on a (B, H, W, C) map."""
  dim: int
  num_heads: int
  window: int
  shift: int
  mlp_ratio: float = 4.0
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    resolution = x.shape[1]
    y = layer_norm(self.dtype, 'norm1')(x)
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = jnp.asarray(
          shifted_window_mask(resolution, self.window, self.shift))
    else:
      mask = None
    y = WindowAttention(self.dim, self.num_heads, self.window, self.attn_drop,
                        self.drop, self.dtype, name='attn')(
                            partition_windows(y, self.window), mask, train)
    y = merge_windows(y, self.window)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    drop_path = DropPath(self.drop_path)
    x = x + drop_path(y, train)
    y = Mlp(int(self.dim * self.mlp_ratio), self.drop, self.dtype, name='mlp')(
        layer_norm(self.dtype, 'norm2')(x), train)
    return x + drop_path(y, train)


class SwinStage(nn.Module):
  """`depth` Swin blocks alternating plain and shifted windows.

  Returns (output, first block output).
  """
  dim: int
  depth: int
  num_heads: int
  window: int
  shift: int
  drop_path: Sequence[float]
  mlp_ratio: float = 4.0
  drop: float = 0.0
  attn_drop: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    first = None
    for i in range(self.depth):
      x = SwinBlock(self.dim, self.num_heads, self.window,
                    self.shift if i % 2 else 0, self.mlp_ratio, self.drop,
                    self.attn_drop, self.drop_path[i], self.dtype,
                    name=f'blocks_{i}')(x, train)
      first = x if first is None else first
    return x, first


class PatchMerging(nn.Module):
  """(B, H, W, C) -> (B, H/2, W/2, 2C): concat 2x2 neighbours, LN, Linear."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                         x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layer_norm(self.dtype, 'norm')(x)
    return dense(2 * dim, self.dtype, use_bias=False, name='reduction')(x)


def pixel_shuffle(x: jax.Array) -> jax.Array:
  """(B, H, W, s, s, C) -> (B, sH, sW, C): pixel (i, j) of cell (h, w) goes
  to (s*h + i, s*w + j)."""
  b, h, w, s, _, c = x.shape
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)


class PatchExpand(nn.Module):
  """(B, H, W, C) -> (B, sH, sW, out_dim): Linear, pixel shuffle, LN.

  The LayerNorm normalises each output pixel's out_dim channels, so it runs
  before the shuffle (same result): fused with the shuffle's transpose it
  was XLA:CPU's slowest op of the whole Swin-UNet step. With shuffled=False
  the result is left unshuffled, (B, H, W, s, s, out_dim).
  """
  scale: int
  out_dim: int
  dtype: Any = jnp.float32
  shuffled: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    s = self.scale
    x = dense(s * s * self.out_dim, self.dtype, use_bias=False,
              name='expand')(x)
    x = layer_norm(self.dtype, 'norm')(x.reshape(b, h, w, s, s, self.out_dim))
    return pixel_shuffle(x) if self.shuffled else x


class SwinUNet(nn.Module):
  """Swin-UNet returning (logits, Features).

  Attributes:
    num_classes: output channels.
    image_size: square input size in pixels (every stage must tile by windows).
    in_channels: 1 (repeated to 3) or 3.
    patch_size, embed_dim, depths, num_heads, window_size, mlp_ratio: the
      SwinTransformerSys hyper-parameters ("tiny": 4, 96, 2222, 3/6/12/24, 7, 4).
    drop_rate, attn_drop_rate: dropout rates; drop_path_rate: the largest
      stochastic-depth rate, linear over the encoder blocks and mirrored in
      the decoder.
    dtype: computation dtype (parameters stay float32).
  """
  num_classes: int
  image_size: int = 224
  in_channels: int = 1
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 2, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.2
  dtype: Any = jnp.float32

  def _stage(self, stage: int, window, drop_path, name: str) -> SwinStage:
    _, size, shift = window
    return SwinStage(self.embed_dim * 2 ** stage, self.depths[stage],
                     self.num_heads[stage], size, shift, drop_path,
                     self.mlp_ratio, self.drop_rate, self.attn_drop_rate,
                     self.dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    """x: (B, S, S, in_channels) -> logits (B, S, S, num_classes), Features.

    Taps (first and last block of each stage): encoder stages 0..3 at
    S/4..S/32 with embed_dim*(1, 2, 4, 8) channels; decoder stages 1..3 at
    S/16, S/8, S/4; final = the x4-expanded embed_dim map at S.
    """
    num_stages = len(self.depths)
    if len(self.num_heads) != num_stages:
      raise ValueError(f'depths {self.depths} and num_heads {self.num_heads} '
                       'must have the same length.')
    windows = stage_windows(self.image_size, self.patch_size, num_stages,
                            self.window_size)
    expected = (self.image_size, self.image_size, self.in_channels)
    if x.ndim != 4 or x.shape[1:] != expected or self.in_channels not in (1, 3):
      raise ValueError(f'SwinUNet expects (B, {", ".join(map(str, expected))}) '
                       f'input with 1 or 3 channels, got shape {x.shape}.')
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    rates = np.linspace(0, self.drop_path_rate, sum(self.depths)).tolist()
    starts = np.cumsum((0,) + tuple(self.depths)).tolist()
    stage_rates = [rates[starts[i]:starts[i + 1]] for i in range(num_stages)]

    x = Conv(self.embed_dim, (self.patch_size,) * 2,
             strides=(self.patch_size,) * 2, padding=0, dtype=self.dtype,
             kernel_init=torch_conv_init,
             name='patch_embed_proj')(x.astype(self.dtype))
    x = layer_norm(self.dtype, 'patch_embed_norm')(x)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)

    skips, encoder, encoder_first = [], [], []
    for i in range(num_stages):
      skips.append(x)
      x, first = self._stage(i, windows[i], stage_rates[i], f'layers_{i}')(
          x, train)
      encoder.append(x)
      encoder_first.append(first)
      if i < num_stages - 1:
        x = PatchMerging(self.dtype, name=f'layers_{i}_downsample')(x)
    x = layer_norm(self.dtype, 'norm')(x)

    decoder, decoder_first = [], []
    x = PatchExpand(2, x.shape[-1] // 2, self.dtype, name='layers_up_0')(x)
    for i in range(1, num_stages):
      stage = num_stages - 1 - i
      dim = self.embed_dim * 2 ** stage
      x = jnp.concatenate([x, skips[stage]], axis=-1)
      x = dense(dim, self.dtype, name=f'concat_back_dim_{i}')(x)
      x, first = self._stage(stage, windows[stage], stage_rates[stage],
                             f'layers_up_{i}')(x, train)
      decoder.append(x)
      decoder_first.append(first)
      if i < num_stages - 1:
        x = PatchExpand(2, dim // 2, self.dtype,
                        name=f'layers_up_{i}_upsample')(x)
    x = layer_norm(self.dtype, 'norm_up')(x)
    pixels = PatchExpand(self.patch_size, self.embed_dim, self.dtype,
                         shuffled=False, name='up')(x)
    final = pixel_shuffle(pixels)
    # The 1x1 output convolution acts on each pixel alone, so it runs before
    # the shuffle, which then moves num_classes channels, not embed_dim, and
    # a step whose loss does not read `final` never forms it (item 31).
    logits = pixel_shuffle(Conv(self.num_classes, (1, 1), use_bias=False,
                                dtype=self.dtype, kernel_init=torch_conv_init,
                                name='output')(pixels))
    features = Features(encoder=tuple(encoder), decoder=tuple(decoder),
                        final=final, encoder_first=tuple(encoder_first),
                        decoder_first=tuple(decoder_first))
    return logits, features
