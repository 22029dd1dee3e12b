"""The device mesh of a run and its two shardings.

One mesh axis, 'data', over every device of every process, with Auto axis
types (the Swin window reshapes need Auto's sharding propagation; Explicit
axes, jax.make_mesh's default, reject them). Batches are split along axis 0
over it; variables and optimizer state are replicated.
"""

from typing import Any

import jax

DATA_AXIS = 'data'


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all devices (of all processes) with the axis 'data'."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Sharding that puts a full copy of an array on every device of `mesh`."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Sharding that splits axis 0 of an array over the 'data' axis of `mesh`."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated_shapes(shapes: Any, mesh: jax.sharding.Mesh) -> Any:
  """`shapes` (a pytree of shapes and dtypes) replicated on `mesh`."""
  replicated = replicated_sharding(mesh)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
      shapes)
