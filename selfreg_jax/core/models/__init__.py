"""Model registry: build a model from `config.model`."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from selfreg_jax.core.models.features import Features
from selfreg_jax.core.models.swin_unet import SwinUNet
from selfreg_jax.core.models.unet import UNet

MODELS = {'unet': UNet, 'swin_unet': SwinUNet}

__all__ = ['Features', 'MODELS', 'SwinUNet', 'UNet', 'abstract_variables',
           'create_model']


def create_model(model_config: ml_collections.ConfigDict, **overrides):
  """Builds the model named `model_config.name` from the rest of its fields.

  Every other field of `model_config` is passed as a constructor argument;
  `overrides` (e.g. dtype) take precedence.
  """
  kwargs = dict(model_config)
  name = kwargs.pop('name', None)
  if name not in MODELS:
    raise ValueError(f'config.model.name={name!r} is not a known model; '
                     f'choose one of {sorted(MODELS)}.')
  kwargs.update(overrides)
  for key, value in kwargs.items():
    if isinstance(value, list):
      kwargs[key] = tuple(value)
  model_cls = MODELS[name]
  unknown = set(kwargs) - set(model_cls.__dataclass_fields__)
  if unknown:
    raise ValueError(f'config.model has fields {sorted(unknown)} that '
                     f'{model_cls.__name__} does not take.')
  return model_cls(**kwargs)


def abstract_variables(model: nn.Module, image_size: int) -> Any:
  """Shapes and dtypes of `model`'s variables, traced on one float32
  (1, image_size, image_size, model.in_channels) input without computing."""
  images = jax.ShapeDtypeStruct(
      (1, image_size, image_size, model.in_channels), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images)
