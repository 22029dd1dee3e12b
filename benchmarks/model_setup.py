"""The models the model suites time, with their inputs and initial state.

Full size: the paper's Synapse UNet and Swin-UNet at 224x224
(`configs.base.get_config(dataset='synapse', model=...)`). Smoke: the same
architectures shrunk to 32x32 inputs, a few channels and (Swin-UNet) one block
per stage, which keeps their compiles short.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from configs import base
from selfreg_jax import train
from selfreg_jax.core.models import create_model

SMOKE_IMAGE_SIZE = 32
SMOKE_MODEL_FIELDS = {
    'unet': dict(widths=(8, 16, 32, 64, 128)),
    'swin_unet': dict(image_size=SMOKE_IMAGE_SIZE, patch_size=2, embed_dim=8,
                      depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                      window_size=4),
}
# The optimizer of the timed train step: SGD with momentum, as the recipe.
LEARNING_RATE = 0.01
MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """A model ready to time.

  Attributes:
    config: the experiment config (dataset.image_size is the input size).
    model: the model, computing in the requested dtype.
    tx: the optimizer of the train step.
    state: the initial training state; steps that donate their state must
      be given a copy.
  """
  config: ml_collections.ConfigDict
  model: nn.Module
  tx: optax.GradientTransformation
  state: train.TrainState


def model_config(name: str, dtype: str,
                 smoke: bool) -> ml_collections.ConfigDict:
  config = base.get_config(dataset='synapse', model=name)
  config.dtype = dtype
  if smoke:
    config.dataset.image_size = SMOKE_IMAGE_SIZE
    config.model.update(SMOKE_MODEL_FIELDS[name])
  return config


def _optimizer() -> optax.GradientTransformation:
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM)


@functools.cache
def _initial_state(name: str, smoke: bool) -> train.TrainState:
  """The initial state of a model (parameters are float32 in every dtype,
  so one state serves all dtypes)."""
  config = model_config(name, 'float32', smoke)
  model = create_model(config.model)
  init = jax.jit(functools.partial(train.initial_state, model, _optimizer(),
                                   config))
  return init(jax.random.key(config.seed))


def model_setup(name: str, dtype: str, smoke: bool) -> ModelSetup:
  config = model_config(name, dtype, smoke)
  return ModelSetup(config=config,
                    model=create_model(config.model, dtype=jnp.dtype(dtype)),
                    tx=_optimizer(), state=_initial_state(name, smoke))


def synthetic_batch(config: ml_collections.ConfigDict,
                    batch_size: int) -> dict[str, Any]:
  """{'image': (B, S, S, C) float32 noise, 'label': (B, S, S) int32 classes}
  with S = config.dataset.image_size."""
  size = config.dataset.image_size
  images = jax.random.normal(
      jax.random.key(0), (batch_size, size, size, config.dataset.in_channels))
  labels = jax.random.randint(jax.random.key(1), (batch_size, size, size), 0,
                              config.dataset.num_classes)
  return {'image': images, 'label': labels}


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields that identify a model measurement in a record."""
  return {'model': config.model.name, 'image_size': config.dataset.image_size,
          'dtype': config.dtype}
