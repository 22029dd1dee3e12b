"""Model shapes, parameter counts, train/eval behaviour and jit stability."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_configs as tc
from selfreg_jax.core.models import Features, create_model
from selfreg_jax.core.models.batch_norm import BatchNorm
from selfreg_jax.core.models.swin_unet import DropPath
from selfreg_jax.core.models.unet import align_corners_matrix


def _init(model, image_size, channels=1):
  return tc.init_variables(model, image_size, channels)


def _apply(model, variables, x, rngs=None, **static):
  """model.apply, jit-compiled (eager Flax runs op by op: slow on XLA:CPU)."""
  return jax.jit(functools.partial(model.apply, **static))(variables, x,
                                                           rngs=rngs)


def _images(image_size, seed=0, batch=tc.BATCH):
  return jax.random.normal(jax.random.key(seed),
                           (batch, image_size, image_size, 1))


def _shapes(maps):
  return [m.shape for m in maps]


@pytest.mark.parametrize('size', tc.IMAGE_SIZES)
def test_unet_output_and_tap_shapes(size):
  config = tc.tiny_unet()
  model = create_model(config)
  variables = _init(model, size)
  logits, features = _apply(model, variables, _images(size))
  b, w = tc.BATCH, config.widths
  assert logits.shape == (b, size, size, config.num_classes)
  assert isinstance(features, Features)
  assert _shapes(features.encoder) == [
      (b, size // 2, size // 2, w[1]), (b, size // 4, size // 4, w[2]),
      (b, size // 8, size // 8, w[3]), (b, size // 16, size // 16, w[4] // 2)]
  assert _shapes(features.decoder) == [
      (b, size // 8, size // 8, w[3] // 2), (b, size // 4, size // 4, w[2] // 2),
      (b, size // 2, size // 2, w[1] // 2)]
  assert features.final.shape == (b, size, size, w[0])
  assert features.encoder_first == () and features.decoder_first == ()


@pytest.mark.parametrize('size', tc.IMAGE_SIZES)
def test_swin_output_and_tap_shapes(size):
  config = tc.tiny_swin(size)
  model = create_model(config)
  variables = _init(model, size)
  logits, features = _apply(model, variables, _images(size))
  b, c, p = tc.BATCH, config.embed_dim, config.patch_size
  assert logits.shape == (b, size, size, config.num_classes)
  encoder = [(b, size // p // 2**i, size // p // 2**i, c * 2**i)
             for i in range(4)]
  decoder = encoder[2::-1]
  for maps, expected in ((features.encoder, encoder),
                         (features.encoder_first, encoder),
                         (features.decoder, decoder),
                         (features.decoder_first, decoder)):
    assert _shapes(maps) == expected
  assert features.final.shape == (b, size, size, c)
  # With depth 2 the first and the last block of a stage differ.
  assert not np.allclose(features.encoder[0], features.encoder_first[0])


def test_swin_logits_are_the_output_conv_of_the_final_map():
  """The model applies its 1x1 output convolution before the final pixel
  shuffle; by definition the logits are that convolution of the final map."""
  size = tc.IMAGE_SIZES[0]
  model = create_model(tc.tiny_swin(size))
  variables = _init(model, size)
  logits, features = _apply(model, variables, _images(size))
  kernel = variables['params']['output']['kernel'][0, 0]  # (C, classes)
  np.testing.assert_allclose(logits, np.asarray(features.final) @ kernel,
                             rtol=1e-5, atol=1e-5)


def test_unet_handles_odd_sizes_like_pytorch_unet():
  model = create_model(tc.tiny_unet())
  size = tc.IMAGE_SIZES[0] + 2  # not divisible by 16: upsampled maps get padded
  logits, features = _apply(model, _init(model, size), _images(size))
  assert logits.shape[1:3] == (size, size)
  assert features.final.shape[1:3] == (size, size)


def _param_count(config, image_size, channels):
  model = create_model(config)
  shapes = jax.eval_shape(lambda: _init(model, image_size, channels))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


def test_full_size_parameter_counts():
  assert _param_count(tc.full_unet(), 224, 1) == tc.FULL_UNET_PARAMS
  assert _param_count(tc.full_swin(), 224, 1) == tc.FULL_SWIN_PARAMS


def test_swin_rejects_untileable_image_size():
  config = tc.tiny_swin(tc.IMAGE_SIZES[0])
  config.image_size = tc.IMAGE_SIZES[0] + config.patch_size * 8 // 2
  model = create_model(config)
  with pytest.raises(ValueError, match='cannot be tiled'):
    _init(model, config.image_size)
  config = tc.full_swin()
  config.image_size = 256  # divisible by 32 but 64 is not a multiple of 7
  with pytest.raises(ValueError, match='Sizes that work include'):
    _init(create_model(config), 256)


def test_swin_rejects_input_of_wrong_size():
  size = tc.IMAGE_SIZES[0]
  model = create_model(tc.tiny_swin(size))
  variables = _init(model, size)
  with pytest.raises(ValueError, match='expects'):
    _apply(model, variables, _images(tc.IMAGE_SIZES[1]))


def test_registry_rejects_unknown_model_and_fields():
  config = tc.tiny_unet()
  config.name = 'resnet'
  with pytest.raises(ValueError, match='not a known model'):
    create_model(config)
  config = tc.tiny_unet()
  config.window_size = 7
  with pytest.raises(ValueError, match='window_size'):
    create_model(config)


def test_batchnorm_uses_batch_stats_in_training_and_running_averages_in_eval():
  size = tc.IMAGE_SIZES[0]
  model = create_model(tc.tiny_unet())
  variables = _init(model, size)
  x = _images(size)
  other = x.at[1].set(_images(size, seed=5)[1])
  # Eval: sample 0 does not depend on the rest of the batch.
  eval_a, _ = _apply(model, variables, x)
  eval_b, _ = _apply(model, variables, other)
  np.testing.assert_allclose(eval_a[0], eval_b[0], atol=1e-6)
  # Training: batch statistics couple the samples and update running stats.
  (train_a, _), updates = _apply(model, variables, x, train=True,
                                  mutable=('batch_stats',))
  (train_b, _), _ = _apply(model, variables, other, train=True,
                           mutable=('batch_stats',))
  assert not np.allclose(train_a[0], train_b[0], atol=1e-4)
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(updates['batch_stats'])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))



def test_batchnorm_matches_pytorch_formulas():
  """torch.nn.BatchNorm2d, written in NumPy: biased variance normalises the
  training batch, the UNBIASED one (x n/(n-1)) enters the running average
  with momentum 0.1; eval normalises with the running statistics."""
  rng = np.random.default_rng(0)
  batch, size, channels = tc.BATCH, tc.IMAGE_SIZES[0] // 16, 3
  x = (rng.normal(size=(batch, size, size, channels)) * [1.0, 3.0, 0.5]
       + [2.0, -1.0, 0.0]).astype(np.float32)
  norm = BatchNorm()
  variables = jax.jit(functools.partial(norm.init, train=True))(
      jax.random.key(0), x)
  params = {'scale': rng.uniform(0.5, 2, channels).astype(np.float32),
            'bias': rng.normal(size=channels).astype(np.float32)}
  variables = {**variables, 'params': params}
  train_out, updates = jax.jit(functools.partial(
      norm.apply, train=True, mutable=['batch_stats']))(variables, x)

  flat = x.reshape(-1, channels).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(
      train_out, (x - mean) / np.sqrt(var + 1e-5) * params['scale']
      + params['bias'], rtol=1e-4, atol=1e-5)
  running_mean = 0.9 * 0 + 0.1 * mean
  running_var = 0.9 * 1 + 0.1 * flat.var(0, ddof=1)
  np.testing.assert_allclose(updates['batch_stats']['mean'], running_mean,
                             rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], running_var,
                             rtol=1e-6)
  # Eval after the update, as a converted PyTorch model computes it.
  eval_out = jax.jit(functools.partial(norm.apply, train=False))(
      {**variables, **updates}, x)
  np.testing.assert_allclose(
      eval_out, (x - running_mean) / np.sqrt(running_var + 1e-5)
      * params['scale'] + params['bias'], rtol=1e-4, atol=1e-5)

def test_swin_stochastic_depth_uses_dropout_rng_only_in_training():
  size = tc.IMAGE_SIZES[0]
  model = create_model(tc.tiny_swin(size))
  variables = _init(model, size)
  x = _images(size)
  # Eval needs no RNG and is deterministic.
  np.testing.assert_array_equal(_apply(model, variables, x)[0],
                                _apply(model, variables, x)[0])
  with pytest.raises(Exception, match='dropout'):
    _apply(model, variables, x, train=True)
  out_a = _apply(model, variables, x, train=True,
                 rngs={'dropout': jax.random.key(1)})[0]
  out_b = _apply(model, variables, x, train=True,
                 rngs={'dropout': jax.random.key(2)})[0]
  assert not np.allclose(out_a, out_b)


def test_drop_path_drops_whole_samples_each_by_its_own_draw():
  """Each sample's residual branch is zeroed or scaled by 1/keep as a whole,
  about `rate` of them zeroed, and a sample's draw depends only on the key
  and its index (so a batch split over devices draws the same masks)."""
  rate, batch = 0.25, 512
  x = jnp.ones((batch, 2, 2, 3))
  drop = jax.jit(lambda x: DropPath(rate).apply(
      {}, x, train=True, rngs={'dropout': jax.random.key(0)}))
  out = np.asarray(drop(x))
  per_sample = out.reshape(batch, -1)
  assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / (1 - rate))}
  assert (per_sample == per_sample[:, :1]).all()
  dropped = (per_sample[:, 0] == 0).mean()
  # Binomial(512, 0.25): 4 standard deviations are 0.077.
  assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / batch)
  np.testing.assert_array_equal(drop(x[:8]), out[:8])


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.tiny_swin])
def test_jitted_forward_does_not_retrace(config_fn):
  size = tc.IMAGE_SIZES[0]
  model = create_model(config_fn())
  variables = _init(model, size)
  traces = []

  @jax.jit
  def forward(variables, x):
    traces.append(1)
    return model.apply(variables, x)

  first = forward(variables, _images(size, seed=1))
  second = forward(variables, _images(size, seed=2))
  assert len(traces) == 1
  assert not np.allclose(first[0], second[0])


def test_bfloat16_compute_keeps_float32_params():
  size = tc.IMAGE_SIZES[0]
  model = create_model(tc.tiny_swin(size), dtype=jnp.bfloat16)
  variables = _init(model, size)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits, features = _apply(model, variables, _images(size))
  assert logits.dtype == jnp.bfloat16 and features.final.dtype == jnp.bfloat16


def test_align_corners_upsampling_matches_definition():
  weights = align_corners_matrix(3, 6)
  source = np.array([0.0, 10.0, 30.0])
  # align_corners=True: output i samples input position i * (3-1) / (6-1).
  positions = np.arange(6) * 2 / 5
  np.testing.assert_allclose(weights @ source,
                             np.interp(positions, [0, 1, 2], source),
                             rtol=1e-6)
