"""Losses against independent NumPy references, gradients, and jit stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_configs as tc
from selfreg_jax.core import losses
from selfreg_jax.core.models import create_model

RNG = np.random.default_rng(0)


def np_adaptive_pool(x, out_h, out_w):
  """PyTorch adaptive_avg_pool2d on NHWC, written loop by loop."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    r0, r1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
    for j in range(out_w):
      c0, c1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
      out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


def np_ifd(f):
  f = np.asarray(f, np.float64)
  normed = f / np.maximum(np.sqrt((f ** 2).sum(axis=(1, 2), keepdims=True)),
                          1e-12)
  score = normed.mean(axis=(0, 1, 2))
  order = sorted(range(f.shape[-1]), key=lambda ch: -score[ch])
  half = f.shape[-1] // 2
  # The normalised map ranks the channels; the MSE is of the raw map.
  upper = f[..., order[:half]]
  lower = f[..., order[half:2 * half]]
  return ((upper - lower) ** 2).mean()


def np_scr(s, t, idx_s, idx_t):
  h, w = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
  s, t = np_adaptive_pool(s, h, w), np_adaptive_pool(t, h, w)
  return ((s[..., idx_s] - t[..., idx_t]) ** 2).mean()


def random_draw(c_s, c_t):
  k = min(c_s, c_t)
  return losses.ChannelDraw(student=jnp.asarray(RNG.permutation(c_s)[:k]),
                            teacher=jnp.asarray(RNG.permutation(c_t)[:k]))


@pytest.mark.parametrize('size_in,size_out', [(7, 3), (10, 4), (5, 5), (8, 4),
                                              (9, 2)])
def test_adaptive_pool_matches_pytorch_bin_rule(size_in, size_out):
  x = RNG.normal(size=(2, size_in, size_in + 1, 3)).astype(np.float32)
  got = losses.adaptive_avg_pool(jnp.asarray(x), (size_out, size_out))
  np.testing.assert_allclose(got, np_adaptive_pool(x, size_out, size_out),
                             rtol=1e-5, atol=1e-6)


def test_ifd_matches_numpy_reference():
  f = RNG.normal(size=(2, 6, 5, 7)).astype(np.float32)
  np.testing.assert_allclose(losses.ifd_loss(jnp.asarray(f)), np_ifd(f),
                             rtol=1e-5)


def test_ifd_depends_on_channel_order_as_specified():
  f = np.abs(RNG.normal(size=(2, 4, 4, 6))).astype(np.float32)
  # Permuting channels permutes the scores with them: the loss is unchanged.
  perm = RNG.permutation(6)
  np.testing.assert_allclose(losses.ifd_loss(jnp.asarray(f[..., perm])),
                             losses.ifd_loss(jnp.asarray(f)), rtol=1e-6)
  # Pairing by rank, not by position: the loss differs from a naive split of
  # the unsorted channels whenever the ranking is not already that split.
  normed = f / np.sqrt((f ** 2).sum(axis=(1, 2), keepdims=True))
  naive = ((f[..., :3] - f[..., 3:]) ** 2).mean()
  score = normed.mean(axis=(0, 1, 2))
  assert not np.array_equal(np.argsort(-score)[:3], np.arange(3))
  assert not np.isclose(losses.ifd_loss(jnp.asarray(f)), naive)


def test_ifd_gradient_flows_into_both_halves():
  f = jnp.asarray(RNG.normal(size=(2, 4, 4, 4)).astype(np.float32))
  grad = jax.grad(losses.ifd_loss)(f)
  assert np.all(np.abs(np.asarray(grad)).sum(axis=(0, 1, 2)) > 0)


@pytest.mark.parametrize('s_shape,t_shape', [
    ((2, 4, 4, 8), (2, 16, 16, 4)),     # divisible pooling, C_s > C_t
    ((2, 3, 5, 3), (2, 10, 11, 6)),     # non-divisible pooling, C_s < C_t
    ((2, 8, 8, 5), (2, 8, 8, 5)),       # same size
])
def test_scr_matches_numpy_reference(s_shape, t_shape):
  s = RNG.normal(size=s_shape).astype(np.float32)
  t = RNG.normal(size=t_shape).astype(np.float32)
  draw = random_draw(s_shape[-1], t_shape[-1])
  np.testing.assert_allclose(
      losses.scr_loss(jnp.asarray(s), jnp.asarray(t), draw),
      np_scr(s, t, np.asarray(draw.student), np.asarray(draw.teacher)),
      rtol=1e-5)


def test_scr_teacher_gets_no_gradient_and_student_does():
  s = jnp.asarray(RNG.normal(size=(2, 4, 4, 6)).astype(np.float32))
  t = jnp.asarray(RNG.normal(size=(2, 8, 8, 6)).astype(np.float32))
  grad_s, grad_t = jax.grad(losses.scr_loss, argnums=(0, 1))(
      s, t, random_draw(6, 6))
  assert np.all(np.asarray(grad_t) == 0)
  assert np.any(np.asarray(grad_s) != 0)


def test_channel_draws_are_distinct_differ_between_keys_and_repeat_for_one():
  _, f = _features(tc.tiny_unet)

  def flat(key):
    return [np.asarray(x) for x in jax.tree.leaves(
        losses.draw_channels(key, f))]

  for draw in flat(jax.random.key(0)):
    assert len(set(draw.tolist())) == len(draw)
  for a, b in zip(flat(jax.random.key(0)), flat(jax.random.key(0))):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      flat(jax.random.key(0)), flat(jax.random.key(1))))


def test_cross_entropy_and_dice_match_numpy():
  logits = RNG.normal(size=(2, 5, 6, 4)).astype(np.float32)
  labels = RNG.integers(0, 4, size=(2, 5, 6))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  onehot = np.eye(4)[labels]
  ce = -np.log(np.take_along_axis(probs, labels[..., None], -1)).mean()
  dice = np.mean([1 - (2 * (probs[..., k] * onehot[..., k]).sum() + 1e-5)
                  / ((probs[..., k] ** 2).sum() + (onehot[..., k] ** 2).sum()
                     + 1e-5) for k in range(4)])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), ce,
                             rtol=1e-5)
  np.testing.assert_allclose(losses.soft_dice(logits, labels), dice, rtol=1e-5)


def test_binary_dice_bce_matches_numpy():
  logits = RNG.normal(size=(3, 5, 5, 1)).astype(np.float32)
  labels = RNG.integers(0, 2, size=(3, 5, 5))
  p = 1 / (1 + np.exp(-logits[..., 0]))
  bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
  dice = np.mean([1 - (2 * (p[i] * labels[i]).sum() + 1e-5)
                  / (p[i].sum() + labels[i].sum() + 1e-5) for i in range(3)])
  got_bce, got_dice = losses.binary_dice_bce(logits, labels)
  np.testing.assert_allclose(got_bce, bce, rtol=1e-5)
  np.testing.assert_allclose(got_dice, dice, rtol=1e-5)


def _features(config_fn):
  size = tc.IMAGE_SIZES[0]
  model = create_model(config_fn())
  x = jax.random.normal(jax.random.key(0), (tc.BATCH, size, size, 1))
  variables = tc.init_variables(model, size)
  return jax.jit(model.apply)(variables, x)


def np_selfreg_scr(features, draws):
  """Sum over tap groups of the mean NumPy SCR of the group's taps."""
  return sum(np.mean([
      np_scr(np.asarray(t), np.asarray(features.final),
             np.asarray(d.student), np.asarray(d.teacher))
      for t, d in zip(encoder + decoder, group_draws, strict=True)])
             for (encoder, decoder), group_draws in zip(
                 features.tap_groups(), draws, strict=True))


def test_selfreg_loss_unet_structure():
  _, f = _features(tc.tiny_unet)
  key = jax.random.key(7)
  ifd = (np.mean([np_ifd(m) for m in f.encoder])
         + np.mean([np_ifd(m) for m in f.decoder]))
  terms = losses.selfreg_loss(f, key)
  assert len(f.encoder) == 4 and len(f.decoder) == 3
  np.testing.assert_allclose(
      terms.scr, np_selfreg_scr(f, losses.draw_channels(key, f)), rtol=1e-5)
  np.testing.assert_allclose(terms.ifd, ifd, rtol=1e-4)


def test_selfreg_loss_swin_structure():
  _, f = _features(tc.tiny_swin)
  key = jax.random.key(7)
  expected_ifd = sum(np.mean([np_ifd(m) for m in maps]) for maps in (
      f.encoder, f.encoder_first, f.decoder_first, f.decoder))
  terms = losses.selfreg_loss(f, key)
  assert len(losses.draw_channels(key, f)) == 2
  np.testing.assert_allclose(
      terms.scr, np_selfreg_scr(f, losses.draw_channels(key, f)), rtol=1e-5)
  np.testing.assert_allclose(terms.ifd, expected_ifd, rtol=1e-4)


def _loss_config(**weights):
  config = dict(ce_weight=0.4, dice_weight=0.6, scr_weight=0.015,
                ifd_weight=0.02)
  config.update(weights)
  return config


def test_total_loss_composes_weighted_parts():
  logits, f = _features(tc.tiny_unet)
  labels = jnp.zeros(logits.shape[:-1], jnp.int32)
  config = _loss_config()
  total, parts = losses.total_loss(logits, labels, f, jax.random.key(0), config)
  expected = (0.4 * parts['ce'] + 0.6 * parts['dice'] + 0.015 * parts['scr']
              + 0.02 * parts['ifd'])
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert set(parts) == {'total', 'ce', 'dice', 'scr', 'ifd'}


def test_zero_weight_removes_the_terms_computation():
  logits, f = _features(tc.tiny_unet)
  labels = jnp.zeros(logits.shape[:-1], jnp.int32)

  def loss(config):
    return losses.total_loss(logits, labels, f, jax.random.key(0), config)[0]

  def op_count(config):
    return len(jax.make_jaxpr(lambda: loss(config))().jaxpr.eqns)

  baseline = _loss_config(scr_weight=0.0, ifd_weight=0.0)
  _, parts = losses.total_loss(logits, labels, f, jax.random.key(0), baseline)
  assert parts['scr'] == 0 and parts['ifd'] == 0
  assert op_count(baseline) < op_count(_loss_config(scr_weight=0.0)) < (
      op_count(_loss_config()))


def test_binary_task_uses_dice_bce_on_one_channel():
  logits, f = _features(tc.tiny_unet)
  logits = logits[..., :1]
  labels = (jax.random.uniform(jax.random.key(1), logits.shape[:-1]) > 0.5
            ).astype(jnp.int32)
  config = _loss_config(ce_weight=0.5, dice_weight=0.5)
  _, parts = losses.total_loss(logits, labels, f, jax.random.key(0), config)
  bce, dice = losses.binary_dice_bce(logits, labels)
  np.testing.assert_allclose(parts['ce'], bce)
  np.testing.assert_allclose(parts['dice'], dice)


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.tiny_swin])
def test_loss_and_grad_jit_without_retracing(config_fn):
  size = tc.IMAGE_SIZES[0]
  model = create_model(config_fn())
  x = jax.random.normal(jax.random.key(0), (tc.BATCH, size, size, 1))
  variables = tc.init_variables(model, size)
  config = _loss_config()
  traces = []

  @jax.jit
  def loss_and_grad(params, x, labels, key):
    traces.append(1)

    def loss_fn(params):
      (logits, feats), _ = model.apply(
          {**variables, 'params': params}, x, train=True,
          mutable=['batch_stats'], rngs={'dropout': key})
      return losses.total_loss(logits, labels, feats, key, config)[0]
    return jax.value_and_grad(loss_fn)(params)

  labels = jnp.zeros(x.shape[:-1], jnp.int32)
  first, grads = loss_and_grad(variables['params'], x, labels,
                               jax.random.key(1))
  second, _ = loss_and_grad(variables['params'], x + 1, labels,
                            jax.random.key(2))
  assert len(traces) == 1
  assert np.isfinite(first) and np.isfinite(second) and first != second
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
