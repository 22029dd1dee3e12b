"""Config validation: every bad value is refused by name, before compilation."""

import importlib

import jax
import ml_collections
import numpy as np
import pytest

import tiny_train_config
from configs import demo
from configs import synapse_swin
from selfreg_jax.common import cli
from selfreg_jax.core import configuration
from selfreg_jax.core import outputs
from selfreg_jax.evaluation import metrics
from selfreg_jax.core.models import create_model
from selfreg_jax.core.models import unet

# Devices and processes validate() is told about (the batch checks).
DEVICES = 8
# One recipe per model: the demo UNet and the paper's Synapse Swin-UNet.
RECIPES = {'demo': demo.get_config, 'synapse_swin': synapse_swin.get_config}


def _validate(config):
  configuration.validate(config, device_count=DEVICES, process_count=1)


def _float_keys(tree, prefix=''):
  """Dotted keys of the float leaves of a nested dict."""
  keys = []
  for key, value in tree.items():
    if isinstance(value, dict):
      keys += _float_keys(value, f'{prefix}{key}.')
    elif isinstance(value, float):
      keys.append(f'{prefix}{key}')
  return keys


def _set(config, dotted, value):
  *parents, leaf = dotted.split('.')
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _bottleneck_pixels(image_sizes):
  """{size: pixels a side of the tiny UNet's deepest map} (traced only)."""
  model = create_model(tiny_train_config.get_config('unet').model)

  def images(size):
    return jax.ShapeDtypeStruct((1, size, size, 1), np.float32)
  # The UNet's variables do not depend on the image size.
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             images(unet.MIN_IMAGE_SIZE))
  return {size: jax.eval_shape(model.apply, variables, images(size))[1]
          .encoder[-1].shape[1] for size in image_sizes}


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipes_are_valid(recipe):
  _validate(RECIPES[recipe]())


# The SelfReg lambda of each recipe (docs/design.md section 2, from the
# paper and its public code: one value weights both SCR and IFD).
PUBLIC_LAMBDAS = {'synapse_swin': 0.01, 'synapse_unet': 0.015, 'acdc_swin': 0.1,
                  'acdc_unet': 0.1, 'glas_unet': 0.015, 'glas_swin': 0.015,
                  'monuseg_unet': 0.015, 'monuseg_swin': 0.015}


@pytest.mark.parametrize('recipe', PUBLIC_LAMBDAS)
def test_recipes_weight_both_terms_with_the_public_lambda(recipe):
  loss = importlib.import_module(f'configs.{recipe}').get_config().loss
  assert loss.use_selfreg
  assert (loss.scr_weight, loss.ifd_weight) == (PUBLIC_LAMBDAS[recipe],) * 2


def test_config_errors_are_user_errors():
  assert issubclass(configuration.ConfigError, cli.UserError)


@pytest.mark.parametrize('recipe', RECIPES)
@pytest.mark.parametrize('bad', [float('inf'), float('-inf'), float('nan')])
def test_every_float_field_must_be_finite(recipe, bad):
  keys = _float_keys(RECIPES[recipe]().to_dict())
  assert 'optimizer.learning_rate' in keys and 'loss.ce_weight' in keys
  for key in keys:
    config = RECIPES[recipe]()
    _set(config, key, bad)
    with pytest.raises(configuration.ConfigError) as error:
      _validate(config)
    assert str(error.value) == f'config.{key}={bad!r} must be a finite number.'



@pytest.mark.parametrize('key,value,requirement', [
    ('optimizer.momentum', -0.5, 'in [0, 1)'),
    ('optimizer.momentum', 1.0, 'in [0, 1)'),
    ('optimizer.learning_rate', 0.0, '> 0'),
    ('optimizer.weight_decay', -1e-4, '>= 0'),
    ('optimizer.poly_power', -0.9, '>= 0'),
    ('optimizer.restart_epochs', 0, '> 0'),
    ('loss.ce_weight', -0.4, '>= 0'),
    ('model.drop_path_rate', 1.0, 'in [0, 1)'),
    ('model.attn_drop_rate', -0.1, 'in [0, 1)'),
    ('model.mlp_ratio', 0.0, '> 0'),
])
def test_values_out_of_range_are_refused(key, value, requirement):
  config = synapse_swin.get_config()
  _set(config, key, value)
  with pytest.raises(configuration.ConfigError) as error:
    _validate(config)
  assert str(error.value) == f'config.{key}={value!r} must be {requirement}.'


def test_unet_image_size_is_the_smallest_that_leaves_a_bottleneck():
  # The model is the oracle: below the minimum its deepest map is empty.
  smallest = unet.MIN_IMAGE_SIZE
  sizes = (smallest - 1, smallest, smallest + 1)
  assert _bottleneck_pixels(sizes) == {smallest - 1: 0, smallest: 1,
                                       smallest + 1: 1}
  config = tiny_train_config.get_config('unet')
  for size in sizes[1:]:
    config.dataset.image_size = size
    _validate(config)
  for size in (smallest - 1, 8):  # 8 used to divide by zero in the SCR loss.
    config.dataset.image_size = size
    with pytest.raises(configuration.ConfigError,
                       match=rf'^config\.dataset\.image_size={size}: the UNet '
                       rf'needs >= {smallest}'):
      _validate(config)


def test_cosine_floor_must_not_exceed_the_learning_rate():
  config = demo.get_config()
  config.optimizer.update(schedule='cosine_restarts', min_learning_rate=0.1)
  with pytest.raises(configuration.ConfigError,
                     match=r'min_learning_rate=0\.1 must be <= '
                     r'config\.optimizer\.learning_rate=0\.002'):
    _validate(config)


def test_pretrained_init_needs_the_swin_unet_and_an_existing_file(tmp_path):
  config = demo.get_config()
  config.init.pretrained = str(tmp_path / 'swin_tiny.pth')
  with pytest.raises(configuration.ConfigError,
                     match="is for the Swin-UNet, not 'unet'"):
    _validate(config)
  config = synapse_swin.get_config()
  config.init.pretrained = str(tmp_path / 'swin_tiny.pth')
  with pytest.raises(configuration.ConfigError,
                     match=r'pretrained=.*swin_tiny\.pth.*: no such file'):
    _validate(config)


@pytest.mark.parametrize('change,message', [
    (lambda c: c.update(batch_size=12),
     'config.batch_size=12 must be divisible'),
    (lambda c: c.model.update(image_size=40), 'config.model.image_size'),
    (lambda c: c.optimizer.update(name='lamb'), 'config.optimizer.name'),
    (lambda c: c.model.update(num_classes=3), 'config.model.num_classes'),
    (lambda c: c.model.update(in_channels=3),
     'config.model.in_channels=3 differs from config.dataset.in_channels=1'),
    (lambda c: c.eval.update(metric_mode='medpy'),
     "config.eval.metric_mode='medpy': choose one of"),
    (lambda c: c.init.update(load_final_norm=None),
     'config.init.load_final_norm=None must be True or False'),
])
def test_bad_config_values_fail_with_the_key_named(change, message):
  config = tiny_train_config.get_config('swin_unet')
  change(config)
  if 'image_size' in message:
    config.dataset.image_size = 40
  with pytest.raises(configuration.ConfigError, match=message):
    _validate(config)


def test_flatten_names_every_leaf_of_configs_and_dicts_by_dotted_key():
  config = ml_collections.ConfigDict({
      'seed': 0, 'model': {'depths': (2, 2), 'head': {'bias': None}},
      'empty': {}})
  config.sweep = {'loss': {'scr_weight': [0.0, 0.01]}}
  assert configuration.flatten(config) == {
      'seed': 0, 'model.depths': (2, 2), 'model.head.bias': None,
      'sweep.loss.scr_weight': [0.0, 0.01]}
  assert configuration.flatten({'a': {'b': {'c': 1}}, 'd': [2]}) == {
      'a.b.c': 1, 'd': [2]}


def test_metric_modes_accepted_are_the_ones_metrics_computes():
  """core does not import evaluation, so validation names the modes itself;
  they must be exactly the modes of metrics.multiclass_metrics."""
  assert configuration.CHOICES['eval.metric_mode'] == metrics.MODES


@pytest.mark.parametrize('num_classes, paper, fitting', [
    (2, 1, (2, 1)), (4, 4, (4,)), (9, 9, (9,))])
def test_binary_sets_get_one_sigmoid_logit(num_classes, paper, fitting):
  """UCTransNet's GlaS / MoNuSeg head: one logit for two classes."""
  assert outputs.paper_outputs(num_classes) == paper
  assert outputs.fitting_outputs(num_classes) == fitting
  logits = np.array([[[[-0.1], [0.1]]]], np.float32)
  np.testing.assert_array_equal(outputs.class_map(logits), [[[0, 1]]])
  assert outputs.class_ids(1) == (1,) and outputs.class_ids(3) == (0, 1, 2)
  assert outputs.loss_part_names(1)['ce'] == 'bce'
  assert outputs.loss_part_names(num_classes)['ce'] == 'ce'
