"""The run context: what every entry point builds once from its config.

Training, evaluation, analysis and conversion all need the same few things:
the device mesh and its shardings, the model with the shapes of its variables,
and the opened data set with its facts (classes, class names, channels,
volumetric). `create` validates the config, takes the model saved with a
run's checkpoints, and builds them once; the functions below the entry points
receive the context instead of re-deriving them from the config.

The mesh and its shardings are `sharding.py`'s.
"""

import dataclasses
import pathlib
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from selfreg_jax.core import checkpoints
from selfreg_jax.core import configuration
from selfreg_jax.core import input_pipeline
from selfreg_jax.core import models
from selfreg_jax.core import outputs
from selfreg_jax.core import sharding

@dataclasses.dataclass(frozen=True)
class RunContext:
  """What a run's code shares, built once by `create`.

  Attributes:
    config: the validated config (its model the run's saved one, if any).
    mesh: the data mesh over all devices.
    model: the Flax model of config.model, computing in config.dtype.
    abstract_variables: shapes, dtypes and (replicated) shardings of the
      model's variables.
    data: the opened data set; None where the entry point reads no data
      (conversion).
    saved_config: the config saved with the run's newest checkpoint; None for
      a new run (or a run saved before configs were saved).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: nn.Module
  abstract_variables: Any
  data: input_pipeline.DataSet | None
  saved_config: ml_collections.ConfigDict | None = None

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return sharding.replicated_sharding(self.mesh)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)

  @property
  def num_outputs(self) -> int:
    """The model's output channels (1 for the binary sigmoid head)."""
    return self.config.model.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    """Names of the foreground classes 1..C-1 (the data set's own, else
    generic ones)."""
    if self.data is not None:
      return self.data.class_names
    return input_pipeline.generic_class_names(self.config.dataset.num_classes)

  @property
  def loss_part_names(self) -> dict[str, str]:
    return outputs.loss_part_names(self.num_outputs)


def create(config: ml_collections.ConfigDict, mode: str = 'train_and_eval',
           *, workdir: str | pathlib.Path | None = None,
           overridden: Collection[str] = (),
           open_data: bool = True) -> RunContext:
  """Validates `config` and builds the run's context.

  Args:
    config: the command's config.
    mode: 'train', 'eval' or 'train_and_eval' (what `configuration.validate`
      checks for).
    workdir: the run's folder; when its checkpoints hold a saved config, the
      model is that one (`checkpoints.with_stored_model`): a resumed or
      evaluated run keeps the model it was trained with.
    overridden: dotted config keys set on the command line; an overridden
      model field must equal the saved model's.
    open_data: open config.dataset (and check it against the config).

  Raises:
    UserError: the config is invalid, differs from the saved model where
      overridden, or does not match the built data set.
  """
  saved = None
  if workdir is not None and checkpoints.has_checkpoints(workdir):
    try:
      saved = checkpoints.stored_config(workdir)
      config = checkpoints.with_stored_model(config, saved, workdir,
                                             overridden)
    except checkpoints.CheckpointError:
      if mode == 'eval':
        raise
      # Training moves the damaged step aside and resumes from the newest
      # intact one (`checkpoints.restore_newest_intact`).
  configuration.validate(config, mode)
  mesh = sharding.data_mesh()
  model = models.create_model(config.model, dtype=jnp.dtype(config.dtype))
  shapes = models.abstract_variables(model, config.dataset.image_size)
  data = input_pipeline.DataSet.open(config.dataset) if open_data else None
  return RunContext(config=config, mesh=mesh, model=model,
                    abstract_variables=sharding.replicated_shapes(shapes, mesh),
                    data=data, saved_config=saved)
