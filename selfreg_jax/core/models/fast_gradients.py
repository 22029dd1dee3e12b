"""Faster gradients for the models and losses: every platform trick, named.

Each function here computes what the plain JAX call it stands in for computes;
only the program XLA runs differs. The tricks, the platforms they apply to and
the items of benchmarks/NOTES.md that measure them:

- Kernel gradient of a stride-1 convolution as matrix products of shifted
  input windows with the output gradient, in a loop over bands of output
  rows for narrow layers, or of the input with shifted output gradients for
  wide layers that narrow (`conv_general_dilated`, in `Conv`). XLA:CPU only,
  selected by `lax.platform_dependent`; elsewhere XLA's own gradient (cuDNN's
  is fast). XLA:CPU lowers the kernel gradient of a 3x3 "same" convolution to
  a convolution with an image-sized window on a slow generic path (items 2-4,
  27, 28).
- Convolutions whose stride equals their kernel (patch embedding, 1x1) as a
  reshape and one matrix product (`conv_general_dilated`; Flax's 'SAME' and
  'VALID' paddings are resolved to pairs first, item 28). All platforms: on
  XLA:CPU it removes the slow kernel gradient from the Swin-UNet's patch
  embedding and output convolution and the UNet's `outc` (item 6); it is the
  same product on any backend, and the H200 figures of NOTES were measured
  with it.
- A channel gather whose gradient is the gather of the output gradient by the
  inverse index, not a scatter-add (`take_channels`). All platforms:
  scatter-add is slow on XLA:CPU (item 8) and on an H200 (item 18).
- 2x2 max-pooling as a maximum over a reshaped array, with a gradient that
  gives each window's output gradient to its first maximum in row-major
  order, as PyTorch's max_pool2d does (`max_pool_2x2`). All platforms: on
  XLA:CPU `nn.max_pool`'s gradient is a reduce-window carrying index arrays,
  twice as slow (NOTES item 28).
- A dense layer's product over its input viewed as a matrix
  (`matrix_dot_general`, the `dot_general` of the Swin-UNet's `nn.Dense`
  layers). All platforms: over the (B, nH, nW, N, C) windows the kernel
  gradient contracts five axes, which XLA:CPU lowers to a transposed copy of
  both operands first; over (B*nH*nW*N, C) it is one product of the arrays as
  they lie (item 31).
- The gathered channels materialised by an `optimization_barrier`
  (`take_channels`), so XLA does not fuse the gather into the reductions over
  it. XLA:CPU only, selected by `lax.platform_dependent`: those fusions were
  slow there (item 8); on an H200 it made no difference (item 18).
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                out_spec=(0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` with faster gradients for NHWC/HWIO convs.

  Parameters and results are those of `lax.conv_general_dilated`.
  """
  kernel = rhs.shape[:-2]
  nhwc = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == NHWC)
  if nhwc and isinstance(padding, str):  # Flax passes 'SAME' and 'VALID' on
    padding = lax.padtype_to_pads(lhs.shape[1:-1], kernel, window_strides,
                                  padding)
  plain = (nhwc and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in lhs_dilation or (1,))
           and all(d == 1 for d in rhs_dilation or (1,)))
  if (plain and tuple(window_strides) == kernel
      and all(lo == hi == 0 for lo, hi in padding)
      and all(n % k == 0 for n, k in zip(lhs.shape[1:-1], kernel))):
    return _patch_conv(lhs, rhs, precision)
  if plain and all(s == 1 for s in window_strides):
    return _stride1_conv(lhs, rhs, tuple(map(tuple, padding)), precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, precision=precision, **kwargs)


# The convolution layer of the models: `nn.Conv` computing with
# `conv_general_dilated` (the same parameters and values as `nn.Conv`).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _xla_conv(lhs, rhs, padding, precision):
  return lax.conv_general_dilated(lhs, rhs, (1, 1), padding,
                                  dimension_numbers=NHWC, precision=precision)


def _patch_conv(lhs, rhs, precision):
  """Non-overlapping kh x kw patches times the kernel: (B, H/kh, W/kw, O)."""
  b, h, w, c = lhs.shape
  kh, kw, _, out = rhs.shape
  patches = lhs.reshape(b, h // kh, kh, w // kw, kw, c).transpose(
      0, 1, 3, 2, 4, 5).reshape(b, h // kh, w // kw, kh * kw * c)
  return jnp.dot(patches, rhs.reshape(kh * kw * c, out), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _stride1_conv(lhs, rhs, padding: Sequence[tuple[int, int]], precision):
  """lhs (B, H, W, C), rhs (kh, kw, C, O), explicit padding, stride 1."""
  return _xla_conv(lhs, rhs, padding, precision)


def _stride1_conv_fwd(lhs, rhs, padding, precision):
  return _xla_conv(lhs, rhs, padding, precision), (lhs, rhs)


def _xla_gradients(padding, precision, lhs, rhs, grad_out):
  """(grad lhs, grad rhs) of the stride-1 convolution, XLA's own."""
  _, vjp = jax.vjp(lambda x, k: _xla_conv(x, k, padding, precision), lhs, rhs)
  return vjp(grad_out)


# The kernel gradient loops over bands of output rows for kernels of at most
# this many elements (narrow layers, whose whole-batch products are slow: up
# to 256 x 128 channels), with bands of shifted windows of at most
# _BAND_ELEMENTS (NOTES items 28 and 34).
_BANDED_KERNEL_ELEMENTS = 2 ** 19
_BAND_ELEMENTS = 2 ** 20


def _matmul_gradients(padding, precision, lhs, rhs, grad_out,
                      banded_kernel_elements=_BANDED_KERNEL_ELEMENTS,
                      band_elements=_BAND_ELEMENTS):
  """(grad lhs, grad rhs): XLA's input gradient, and the kernel gradient as
  matrix products accumulated in fp32.

  Narrow layers (at most banded_kernel_elements kernel elements) loop over
  bands of `rows` output rows: the kw column shifts of the padded input band
  are concatenated along channels (B, rows + kh - 1, W', kw * C), in cache,
  and each of its kh row offsets is one product per image with the band's
  output gradient, (rows * W', O)^T x (rows * W', kw * C). The sums stay per
  image until after the loop, so that with the batch sharded over devices
  nothing is communicated in it. Wider layers take whole-batch products:
  with more input than output channels one product of the padded input with
  the output gradient shifted to the kh * kw offsets (B * H'' * W'', C)^T x
  (B * H'' * W'', kh * kw * O); otherwise kh * kw products (B * H' * W',
  C)^T x (B * H' * W', O) of shifted input windows.
  """
  kh, kw, channels, out = rhs.shape
  flipped = jnp.flip(rhs, (0, 1)).swapaxes(2, 3)
  grad_lhs = _xla_conv(grad_out, flipped,
                       [(k - 1 - lo, k - 1 - hi)
                        for k, (lo, hi) in zip((kh, kw), padding)],
                       precision)
  padded = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  if rhs.size <= banded_kernel_elements:
    grad_rhs = _banded_kernel_gradient(padded, grad_out, kh, kw, precision,
                                       band_elements)
  elif channels > out:
    grad_rhs = _shifted_gradient_kernel_gradient(padded, grad_out, kh, kw,
                                                 precision)
  else:
    grad_rhs = _whole_kernel_gradient(padded, grad_out, kh, kw, precision)
  return grad_lhs, grad_rhs.astype(rhs.dtype)


def _whole_kernel_gradient(padded, grad_out, kh, kw, precision):
  """(kh, kw, C, O) from kh * kw whole-batch products, fp32."""
  _, out_h, out_w, out = grad_out.shape
  flat_grad = grad_out.reshape(-1, out)
  return jnp.stack([jnp.stack([
      lax.dot_general(
          padded[:, i:i + out_h, j:j + out_w].reshape(-1, padded.shape[-1]),
          flat_grad, (((0,), (0,)), ((), ())), precision=precision,
          preferred_element_type=jnp.float32)
      for j in range(kw)]) for i in range(kh)])


def _shifted_gradient_kernel_gradient(padded, grad_out, kh, kw, precision):
  """(kh, kw, C, O) from one whole-batch product, fp32: the padded input
  (B * H'' * W'', C) as it lies, times the output gradient placed at each of
  the kh * kw offsets of the padded grid, side by side (B * H'' * W'',
  kh * kw * O). It copies the O-channel gradient where the windows' form
  copies the C-channel input, so it is the cheaper one when C > O."""
  _, height, width, channels = padded.shape
  _, out_h, out_w, out = grad_out.shape
  shifts = jnp.concatenate([
      jnp.pad(grad_out, ((0, 0), (i, height - out_h - i),
                         (j, width - out_w - j), (0, 0)))
      for i in range(kh) for j in range(kw)], -1)
  product = lax.dot_general(
      padded.reshape(-1, channels), shifts.reshape(-1, kh * kw * out),
      (((0,), (0,)), ((), ())), precision=precision,
      preferred_element_type=jnp.float32)
  return product.reshape(channels, kh, kw, out).transpose(1, 2, 0, 3)


def _banded_kernel_gradient(padded, grad_out, kh, kw, precision,
                            band_elements):
  """(kh, kw, C, O) from products over bands of output rows, fp32."""
  batch, out_h, out_w, out = grad_out.shape
  channels = padded.shape[-1]
  rows = _band_rows(out_h, batch * out_w * kw * channels, band_elements)

  def add_band(band, totals):
    first = band * rows
    window = lax.dynamic_slice_in_dim(padded, first, rows + kh - 1, axis=1)
    grad = lax.dynamic_slice_in_dim(grad_out, first, rows, axis=1).reshape(
        batch, rows * out_w, out)
    shifted = jnp.concatenate([window[:, :, j:j + out_w] for j in range(kw)],
                              -1)
    return totals + jnp.stack([
        lax.dot_general(
            grad, shifted[:, i:i + rows].reshape(batch, -1, kw * channels),
            (((1,), (1,)), ((0,), (0,))), precision=precision,
            preferred_element_type=jnp.float32)
        for i in range(kh)], axis=1)

  totals = lax.fori_loop(0, out_h // rows, add_band,
                         jnp.zeros((batch, kh, out, kw * channels), jnp.float32))
  return totals.sum(0).reshape(kh, out, kw, channels).transpose(0, 2, 3, 1)


def _band_rows(height: int, row_elements: int, band_elements: int) -> int:
  """The most rows, a divisor of height, with rows * row_elements <=
  band_elements (at least 1)."""
  return max(r for r in range(1, height + 1)
             if height % r == 0 and (r == 1 or r * row_elements <= band_elements))


def _stride1_conv_bwd(padding, precision, residuals, grad_out):
  lhs, rhs = residuals
  return lax.platform_dependent(
      lhs, rhs, grad_out,
      cpu=functools.partial(_matmul_gradients, padding, precision),
      default=functools.partial(_xla_gradients, padding, precision))


_stride1_conv.defvjp(_stride1_conv_fwd, _stride1_conv_bwd)


def matrix_dot_general(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
  """`lax.dot_general` of `nn.Dense`: lhs (..., C) times rhs (C, O), with lhs
  flattened to (prod(...), C) for the product; -> (..., O)."""
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
    raise ValueError('matrix_dot_general contracts the last axis of lhs with '
                     f'the first of rhs only, got {dimension_numbers}.')
  product = lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs,
                            (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)
  return product.reshape(lhs.shape[:-1] + rhs.shape[1:])


def _windows_2x2(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H//2, 2, W//2, 2, C); an odd last row or column is
  dropped, as by a VALID 2x2 pooling."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))`: (B, H, W, C) -> (B, H//2,
  W//2, C), with the same gradient (all of it to the first maximum of each
  window in row-major order)."""
  return _windows_2x2(x).max(axis=(2, 4))


def _max_pool_2x2_fwd(x):
  pooled = max_pool_2x2(x)
  return pooled, (x, pooled)


def _max_pool_2x2_bwd(residuals, grad):
  x, pooled = residuals
  windows = _windows_2x2(x)
  at_max = windows == pooled[:, :, None, :, None]
  # Row-major positions (0, 0), (0, 1), (1, 0), (1, 1) of each window.
  positions = [at_max[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]
  taken = jnp.zeros_like(positions[0])
  grads = []
  for position in positions:
    grads.append(jnp.where(position & ~taken, grad, 0).astype(grad.dtype))
    taken = taken | position
  b, h, w, c = x.shape
  window_grads = jnp.stack(grads, axis=3).reshape(b, h // 2, w // 2, 2, 2, c)
  grad_x = window_grads.transpose(0, 1, 3, 2, 4, 5).reshape(
      b, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(grad_x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def _materialised_on_cpu(x: jax.Array) -> jax.Array:
  """x; on XLA:CPU behind an `optimization_barrier`, so that it is computed
  into its own buffer rather than fused into its consumers."""
  return lax.platform_dependent(x, cpu=lax.optimization_barrier,
                                default=lambda x: x)


@jax.custom_vjp
def take_channels(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[..., index] for distinct indices, with a gather as its gradient.

  x (..., C), index (k,) distinct ints in [0, C) -> (..., k). The gradient
  is the output gradient gathered by the inverse index (zero for channels not
  drawn), which equals the scatter-add `jnp.take` would use because the
  indices are distinct.
  """
  return _materialised_on_cpu(jnp.take(x, index, axis=-1))


def _take_channels_fwd(x, index):
  return take_channels(x, index), (index, x.shape[-1])


def _take_channels_bwd(residuals, grad):
  index, channels = residuals
  drawn = index.shape[0]
  inverse = jnp.full((channels,), drawn, index.dtype).at[index].set(
      jnp.arange(drawn, dtype=index.dtype))
  padded = jnp.concatenate([grad, jnp.zeros_like(grad[..., :1])], axis=-1)
  return _materialised_on_cpu(jnp.take(padded, inverse, axis=-1)), None


take_channels.defvjp(_take_channels_fwd, _take_channels_bwd)
