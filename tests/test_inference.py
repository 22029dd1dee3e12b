"""Tests of selfreg_jax.evaluation.inference on tiny models (CPU)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from selfreg_jax.core import sharding
from selfreg_jax.core.models import create_model
from selfreg_jax.evaluation import inference
import tiny_configs

IMAGE_SIZE = tiny_configs.IMAGE_SIZES[0]
BATCH_SIZE = 4
# Native slice sizes (H, W) that do not match IMAGE_SIZE: odd, non-square.
NATIVE_SIZES = ((37, 51), (IMAGE_SIZE + 1, IMAGE_SIZE - 3), (17, 17), (9, 64))
# A bias that makes one logit win everywhere over random weights.
DOMINANT_BIAS = 1e3


def make_mesh(num_devices: int = 1) -> jax.sharding.Mesh:
  return jax.make_mesh((num_devices,), (sharding.DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:num_devices])


def numpy_variables(model, image_size: int, in_channels: int, seed: int = 0):
  """Variables of `model` drawn with NumPy (no jit of model.init needed).

  Kernels ~ N(0, 1/fan_in), BatchNorm scale and running variance 1, biases
  and running means 0.
  """
  abstract = jax.eval_shape(
      lambda key: model.init(
          key, jax.numpy.zeros((1, image_size, image_size, in_channels)),
          train=False), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = max(1, int(np.prod(leaf.shape[:-1])))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
        leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def predicting_constant(variables, class_id: int, num_logits: int):
  """`variables` changed so that the UNet's output is `class_id` everywhere.

  For one logit, class 1 = a large positive bias, class 0 = a large negative
  one; otherwise the bias of logit `class_id` is large.
  """
  outc = dict(variables['params']['outc'])
  outc['kernel'] = np.zeros_like(outc['kernel'])
  if num_logits == 1:
    sign = 2 * class_id - 1
    outc['bias'] = np.full_like(outc['bias'], sign * DOMINANT_BIAS)
  else:
    one_hot = np.eye(num_logits, dtype=outc['bias'].dtype)[class_id]
    outc['bias'] = one_hot * DOMINANT_BIAS
  params = dict(variables['params'], outc=outc)
  return dict(variables, params=params)


def tiny_unet(num_classes: int = tiny_configs.NUM_CLASSES,
              in_channels: int = 1) -> ml_collections.ConfigDict:
  config = tiny_configs.tiny_unet()
  config.num_classes = num_classes
  config.in_channels = in_channels
  return config


@pytest.fixture(scope='module')
def unet():
  model = create_model(tiny_unet())
  return model, numpy_variables(model, IMAGE_SIZE, 1)


def _images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.random((count, height, width, 1), dtype=np.float32)


def test_predict_fn_is_cached_per_model_and_mesh(unet):
  model, _ = unet
  mesh = make_mesh()
  assert inference.make_predict_fn(model, mesh) is inference.make_predict_fn(
      create_model(tiny_unet()), mesh)


def test_batched_prediction_equals_one_slice_at_a_time(unet):
  model, variables = unet
  predict_fn = inference.make_predict_fn(model, make_mesh())
  images = _images(BATCH_SIZE + 1, IMAGE_SIZE, IMAGE_SIZE)
  # Images at the model's size: predict_volume resizes nothing.
  batched = inference.predict_volume(predict_fn, variables, images, IMAGE_SIZE,
                                     BATCH_SIZE)
  one_by_one = inference.predict_volume(predict_fn, variables, images,
                                        IMAGE_SIZE, 1)
  assert batched.shape == (len(images), IMAGE_SIZE, IMAGE_SIZE)
  assert batched.dtype == np.uint8
  np.testing.assert_array_equal(batched, one_by_one)
  # The random model does not predict one class everywhere.
  assert len(np.unique(batched)) > 1
  # Padding does not leak into the predictions: each slice alone agrees.
  alone = inference.predict_volume(predict_fn, variables, images[-1:],
                                   IMAGE_SIZE, BATCH_SIZE)
  np.testing.assert_array_equal(alone[0], batched[-1])


def test_resize_round_trips_shape_for_odd_non_square_sizes():
  rng = np.random.default_rng(0)
  for height, width in NATIVE_SIZES:
    image = rng.random((height, width, 3), dtype=np.float32)
    resized = inference.resize_image(image, IMAGE_SIZE)
    assert resized.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert resized.dtype == np.float32
    labels = rng.integers(0, tiny_configs.NUM_CLASSES,
                          (IMAGE_SIZE, IMAGE_SIZE)).astype(np.uint8)
    back = inference.resize_labels(labels, (height, width))
    assert back.shape == (height, width) and back.dtype == np.uint8
    # Nearest neighbour creates no new class ids.
    assert set(np.unique(back)) <= set(np.unique(labels))


def test_predict_volume_returns_native_size(unet):
  model, variables = unet
  predict_fn = inference.make_predict_fn(model, make_mesh())
  num_slices = BATCH_SIZE + 2
  for height, width in NATIVE_SIZES[:2]:
    volume = _images(num_slices, height, width)
    prediction = inference.predict_volume(predict_fn, variables, volume,
                                          IMAGE_SIZE, BATCH_SIZE)
    assert prediction.shape == (num_slices, height, width)
    assert prediction.dtype == np.uint8
    # Same as predicting the resized slices and resizing the maps back.
    resized = np.stack([inference.resize_image(s, IMAGE_SIZE) for s in volume])
    at_model_size = inference.predict_volume(predict_fn, variables, resized,
                                             IMAGE_SIZE, BATCH_SIZE)
    np.testing.assert_array_equal(prediction, np.stack(
        [inference.resize_labels(p, (height, width)) for p in at_model_size]))


@pytest.mark.parametrize('class_id', [0, 1])
def test_one_logit_model_thresholds_sigmoid(class_id):
  model = create_model(tiny_unet(num_classes=1))
  variables = predicting_constant(numpy_variables(model, IMAGE_SIZE, 1),
                                  class_id, num_logits=1)
  predict_fn = inference.make_predict_fn(model, make_mesh())
  prediction = inference.predict_volume(predict_fn, variables,
                                        _images(2, *NATIVE_SIZES[0]),
                                        IMAGE_SIZE, BATCH_SIZE)
  np.testing.assert_array_equal(prediction, class_id)


def test_predict_images_resizes_images_and_labels(unet):
  model, variables = unet
  predict_fn = inference.make_predict_fn(model, make_mesh())
  rng = np.random.default_rng(1)
  images = [_images(1, h, w, seed=i)[0]
            for i, (h, w) in enumerate(NATIVE_SIZES)]
  labels = [rng.integers(0, 2, image.shape[:2]).astype(np.uint8)
            for image in images]
  predictions, resized_labels = inference.predict_images(
      predict_fn, variables, images, labels, IMAGE_SIZE, BATCH_SIZE)
  expected_shape = (len(images), IMAGE_SIZE, IMAGE_SIZE)
  assert predictions.shape == resized_labels.shape == expected_shape
  resized = np.stack([inference.resize_image(i, IMAGE_SIZE) for i in images])
  np.testing.assert_array_equal(
      predictions,
      inference.predict_volume(predict_fn, variables, resized, IMAGE_SIZE,
                               BATCH_SIZE))
  for label, resized_label in zip(labels, resized_labels):
    np.testing.assert_array_equal(
        resized_label, inference.resize_labels(label, (IMAGE_SIZE,) * 2))


def test_bad_inputs_raise_clear_errors(unet):
  model, variables = unet
  predict_fn = inference.make_predict_fn(model, make_mesh())
  with pytest.raises(ValueError, match='D, H, W, C'):
    inference.predict_volume(predict_fn, variables,
                             np.zeros((3, 8, 8), np.float32), IMAGE_SIZE,
                             BATCH_SIZE)
  with pytest.raises(ValueError, match='does not match its label'):
    inference.predict_images(predict_fn, variables,
                             [np.zeros((8, 9, 1), np.float32)],
                             [np.zeros((9, 8), np.uint8)], IMAGE_SIZE,
                             BATCH_SIZE)
  with pytest.raises(ValueError, match="axis named 'data'"):
    inference.make_predict_fn(
        model, jax.make_mesh((1,), ('batch',),
                             axis_types=(jax.sharding.AxisType.Auto,)))


_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import jax
    import numpy as np
    from selfreg_jax.core import sharding
    from selfreg_jax.core.models import create_model
    from selfreg_jax.evaluation import inference
    import test_inference as t

    assert jax.device_count() == {devices}
    model = create_model(t.tiny_unet())
    variables = t.numpy_variables(model, t.IMAGE_SIZE, 1)
    images = t._images(t.BATCH_SIZE + 1, t.IMAGE_SIZE, t.IMAGE_SIZE)
    results = []
    for devices in (1, {devices}):
      predict_fn = inference.make_predict_fn(model, t.make_mesh(devices))
      results.append(inference.predict_volume(
          predict_fn, jax.device_put(variables, sharding.replicated_sharding(
              t.make_mesh(devices))),
          images, t.IMAGE_SIZE, t.BATCH_SIZE))
    np.testing.assert_array_equal(results[0], results[1])
    try:
      predict_fn(variables, images[:{devices} + 1])
    except ValueError as e:
      assert 'multiple of the {devices} devices' in str(e), e
    else:
      raise AssertionError('an indivisible batch was accepted')
    print('OK')
''')


def test_sharded_over_two_devices_matches_one_device():
  devices = 2
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ,
             XLA_FLAGS=(os.environ['XLA_FLAGS'] +
                        f' --xla_force_host_platform_device_count={devices}'),
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(root), str(root / 'tests')]))
  result = subprocess.run(
      [sys.executable, '-c', _MULTI_DEVICE_SCRIPT.format(devices=devices)],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')
