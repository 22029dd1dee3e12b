"""Segmentation losses and the SelfReg regularisers (pure, jit-compatible).

Shapes: logits (B, H, W, K), labels (B, H, W) int, feature maps (B, h, w, c).

The SelfReg terms (SelfReg-UNet, MICCAI 2024):
- IFD, internal feature distillation, on one map: channels are ranked by their
  mean activation after L2-normalising each (sample, channel) map over space;
  the upper half of the ranking is pulled towards the lower half (MSE of the
  raw maps: the normalised maps serve the ranking only). The ranking carries
  no gradient; neither half is detached.
- SCR, semantic consistency regularisation, between a tapped map S and the
  final decoder map T: both are average-pooled to the smaller spatial size,
  k = min(C_S, C_T) channels are drawn at random from each, and S is pulled
  towards the stop-gradient of T (MSE).
"""

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from selfreg_jax.core import outputs
from selfreg_jax.core.models.fast_gradients import take_channels
from selfreg_jax.core.models.features import Features

DICE_SMOOTH = 1e-5


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy, mean over pixels."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def soft_dice(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """TransUNet soft Dice on softmax probabilities over the whole batch.

  Per class: 1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps), averaged
  over all classes including background.
  """
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  axes = tuple(range(logits.ndim - 1))
  intersection = jnp.sum(probs * onehot, axis=axes)
  denominator = jnp.sum(probs * probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = (2 * intersection + DICE_SMOOTH) / (denominator + DICE_SMOOTH)
  return jnp.mean(1 - dice)


def binary_dice_bce(logits: jax.Array,
                    labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(BCE, Dice) for a one-channel sigmoid output, as in UCTransNet.

  logits (B, H, W, 1), labels (B, H, W) in {0, 1}. Dice is soft Dice on the
  sigmoid probabilities per sample, 1 - (2 sum(p g) + eps) / (sum(p) + sum(g)
  + eps), averaged over the batch. Returns the two unweighted terms.
  """
  logits = logits[..., 0].astype(jnp.float32)
  target = labels.astype(jnp.float32)
  bce = jnp.mean(jnp.maximum(logits, 0) - logits * target
                 + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  probs = jax.nn.sigmoid(logits)
  axes = tuple(range(1, logits.ndim))
  intersection = jnp.sum(probs * target, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
  dice = 1 - (2 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
  return bce, jnp.mean(dice)


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) averaging weights with PyTorch's adaptive-pool bins.

  Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)).
  """
  weights = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -(-((i + 1) * size_in) // size_out)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C), PyTorch adaptive average pooling."""
  _, height, width, channels = x.shape
  out_h, out_w = size
  if (height, width) == (out_h, out_w):
    return x
  if height % out_h == 0 and width % out_w == 0:
    blocks = x.reshape(-1, out_h, height // out_h, out_w, width // out_w,
                       channels)
    return jnp.mean(blocks, axis=(2, 4), dtype=jnp.float32).astype(x.dtype)
  rows = jnp.asarray(adaptive_pool_matrix(height, out_h), x.dtype)
  cols = jnp.asarray(adaptive_pool_matrix(width, out_w), x.dtype)
  x = jnp.einsum('oh,bhwc->bowc', rows, x)
  return jnp.einsum('pw,bhwc->bhpc', cols, x)


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def ifd_loss(feature: jax.Array) -> jax.Array:
  """Internal feature distillation on one (B, H, W, C) map (C >= 2).

  Channels are ranked by their mean over batch and space of the map
  L2-normalised over (H, W) per (sample, channel); the ranking carries no
  gradient. The loss is the MSE between the RAW map's upper half of the
  ranking and its lower half, channel by channel in rank order, as the public
  code computes it (the normalised map serves the ranking only).
  """
  x = feature.astype(jnp.float32)
  ranking_map = jax.lax.stop_gradient(x)
  norm = jnp.sqrt(jnp.sum(jnp.square(ranking_map), axis=(1, 2), keepdims=True))
  score = jnp.mean(ranking_map / jnp.maximum(norm, 1e-12), axis=(0, 1, 2))
  half = x.shape[-1] // 2
  ranked = take_channels(x, jnp.argsort(-score)[:2 * half])
  return _mse(ranked[..., :half], ranked[..., half:])


class ChannelDraw(NamedTuple):
  """SCR's channel draw for one tap: k = min(c_s, c_t) distinct indices.

  Attributes:
    student: (k,) int indices into the tap's channels.
    teacher: (k,) int indices into the final map's channels.
  """
  student: jax.Array
  teacher: jax.Array


def draw_channels(key: jax.Array, features: Features
                  ) -> tuple[tuple[ChannelDraw, ...], ...]:
  """Fresh SCR channel draws for every tap, without replacement.

  Returns one tuple per tap group of `features.tap_groups()`, holding one
  draw per tap in the group's order (encoder taps, then decoder taps). Student
  and teacher indices are drawn independently.
  """
  teacher_channels = features.final.shape[-1]
  groups = features.tap_groups()
  draws = []
  for (encoder, decoder), group_key in zip(
      groups, jax.random.split(key, len(groups))):
    taps = encoder + decoder
    group = []
    for tap, tap_key in zip(taps, jax.random.split(group_key, len(taps))):
      k = min(tap.shape[-1], teacher_channels)
      key_s, key_t = jax.random.split(tap_key)
      group.append(ChannelDraw(
          student=jax.random.permutation(key_s, tap.shape[-1])[:k],
          teacher=jax.random.permutation(key_t, teacher_channels)[:k]))
    draws.append(tuple(group))
  return tuple(draws)


def scr_loss(student: jax.Array, teacher: jax.Array,
             draw: ChannelDraw) -> jax.Array:
  """Semantic consistency between a tap (B, h, w, c) and the final map.

  Both maps are average-pooled to the smaller of their spatial sizes (a
  teacher already pooled to that size is used as it is), then
  MSE(student[..., draw.student], teacher[..., draw.teacher]). The teacher
  gets no gradient.
  """
  size = (min(student.shape[1], teacher.shape[1]),
          min(student.shape[2], teacher.shape[2]))
  teacher = jax.lax.stop_gradient(adaptive_avg_pool(teacher, size))
  student = adaptive_avg_pool(student, size)
  return _mse(take_channels(student, draw.student),
              jnp.take(teacher, draw.teacher, axis=-1))


def pooled_pyramid(final: jax.Array,
                   sizes: set[tuple[int, int]]) -> dict[tuple[int, int],
                                                        jax.Array]:
  """Stop-gradient `final` pooled to each size (h, w) <= its own.

  Sizes are built from the largest down, each from the smallest already
  pooled map whose bins it divides, so the big map is read once per chain
  rather than once per tap (equal-sized bins make the mean of means the
  mean).
  """
  final = jax.lax.stop_gradient(final)
  pyramid = {final.shape[1:3]: final}
  for size in sorted(sizes, reverse=True):
    source = min((s for s in pyramid
                  if s[0] % size[0] == 0 and s[1] % size[1] == 0),
                 default=final.shape[1:3])
    pyramid[size] = adaptive_avg_pool(pyramid[source], size)
  return pyramid


class SelfRegTerms(NamedTuple):
  scr: jax.Array
  ifd: jax.Array


def selfreg_loss(features: Features, key: jax.Array | None = None, *,
                 draws: tuple[tuple[ChannelDraw, ...], ...] | None = None,
                 compute_scr: bool = True,
                 compute_ifd: bool = True) -> SelfRegTerms:
  """The unweighted SCR and IFD sums of docs/design.md section 2.

  For every tap group (UNet: one; Swin-UNet: last-block taps and first-block
  taps) IFD adds mean(IFD over encoder taps) + mean(IFD over decoder taps) and
  SCR adds mean(SCR of all encoder and decoder taps vs the final map). SCR's
  channel draws are `draws` when given (as `draw_channels` returns them),
  else drawn from `key`. A term that is switched off is not computed at all
  (it returns 0).
  """
  scr = ifd = jnp.zeros((), jnp.float32)
  groups = features.tap_groups()
  if compute_scr:
    if draws is None:
      draws = draw_channels(key, features)
    final_size = features.final.shape[1:3]

    def teacher_size(tap):
      return (min(tap.shape[1], final_size[0]), min(tap.shape[2], final_size[1]))

    pyramid = pooled_pyramid(features.final, {
        teacher_size(t) for encoder, decoder in groups
        for t in encoder + decoder})
  for group, (encoder, decoder) in enumerate(groups):
    if compute_ifd:
      ifd += jnp.mean(jnp.stack([ifd_loss(f) for f in encoder]))
      ifd += jnp.mean(jnp.stack([ifd_loss(f) for f in decoder]))
    if compute_scr:
      scr += jnp.mean(jnp.stack([
          scr_loss(t, pyramid[teacher_size(t)], draw)
          for t, draw in zip(encoder + decoder, draws[group], strict=True)]))
  return SelfRegTerms(scr=scr, ifd=ifd)


def total_loss(logits: jax.Array, labels: jax.Array, features: Features,
               key: jax.Array, loss_config: Mapping
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = w_ce CE + w_dice Dice + scr_weight L_SCR + ifd_weight L_IFD.

  `loss_config` fields: ce_weight, dice_weight, scr_weight, ifd_weight and
  optionally use_selfreg (False: the baseline, both weights 0). The one-logit
  head (`outputs.is_one_logit`) selects the binary Dice+BCE form (ce_weight
  then weights BCE). Returns the scalar and its unweighted parts {ce, dice,
  scr, ifd} plus the total.
  """
  scr_weight, ifd_weight = selfreg_weights(loss_config)
  if outputs.is_one_logit(logits.shape[-1]):
    ce, dice = binary_dice_bce(logits, labels)
  else:
    ce, dice = cross_entropy(logits, labels), soft_dice(logits, labels)
  terms = selfreg_loss(features, key, compute_scr=scr_weight != 0,
                       compute_ifd=ifd_weight != 0)
  total = (loss_config['ce_weight'] * ce + loss_config['dice_weight'] * dice
           + scr_weight * terms.scr + ifd_weight * terms.ifd)
  parts = {'total': total, 'ce': ce, 'dice': dice, 'scr': terms.scr,
           'ifd': terms.ifd}
  return total, parts


def selfreg_weights(loss_config: Mapping) -> tuple[float, float]:
  """(scr_weight, ifd_weight): 0 for the baseline (use_selfreg=False)."""
  if not loss_config.get('use_selfreg', True):
    return 0.0, 0.0
  return float(loss_config['scr_weight']), float(loss_config['ifd_weight'])
