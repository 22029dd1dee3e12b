"""Orbax checkpoints of a run: `WORKDIR/checkpoints/<step>/<item>`.

Items of a step:
  variables: the model variables {'params': ..., 'batch_stats': ...} (all that
    evaluation needs; a converted PyTorch checkpoint holds only this);
  train: the rest of the train state (step, optimizer state);
  data: the grain iterator state of this process (training only);
  config: the run's ConfigDict as JSON.
Validation Dice, when known, is stored as the step's metric so that the best
checkpoint is kept besides the last N.
"""

import functools
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from selfreg_jax import cli

CHECKPOINT_DIR = 'checkpoints'
BEST_METRIC = 'val_dice'


@functools.cache
def _save_arrays_whole() -> None:
  """Makes one replica write each array whole (registered once, on first use).

  Orbax's default splits every replicated array over its replicas and
  compiles a slicing program per array shape: 152 compiles, 7.6 s, on the
  first save of a tiny Swin-UNet over 8 CPU devices, for states (at most a few
  hundred MB) that gain nothing from parallel writes. (This handler keeps no
  PRNG-key metadata; train states hold no keys.)
  """
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
      override=True)


def create_manager(workdir: str | pathlib.Path, *, keep_last: int = 3,
                   keep_best: bool = True,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep_last` steps and the best one."""
  _save_arrays_whole()
  policies = [checkpoint_managers.LatestN(keep_last)]
  if keep_best:
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[BEST_METRIC], n=1,
        keep_checkpoints_without_metrics=False))
  # best_fn makes orbax write each step's metrics beside it (without it they
  # live in memory only, and a resumed run forgets which step was best) and
  # rank the steps for `best_step`; among equal values the latest step wins,
  # as BestN keeps it.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      best_fn=lambda metrics: metrics[BEST_METRIC], best_mode='max',
      read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(
      pathlib.Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def write_variables(workdir: str | pathlib.Path, variables: Any,
                    config: ml_collections.ConfigDict, step: int = 0) -> None:
  """Saves model variables (and the config) alone, e.g. after a conversion."""
  with create_manager(workdir, keep_best=False) as manager:
    manager.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables),
        config=ocp.args.JsonSave(config.to_dict())), force=True)
    manager.wait_until_finished()


def select_step(manager: ocp.CheckpointManager, which: str) -> int:
  """The step to evaluate: 'latest', 'best' or a step number as a string.

  'best' is the step with the highest validation Dice; a run never
  validated (e.g. a converted checkpoint) has none, and gets its latest step.
  """
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}: train '
                            'first or convert a PyTorch checkpoint into it.')
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    best = manager.best_step()
    return manager.latest_step() if best is None else best
  if which.isdigit() and int(which) in steps:
    return int(which)
  raise cli.UserError(
      f'checkpoint {which!r} not found in {manager.directory}; '
      f"choose 'latest', 'best' or one of {sorted(steps)}.")


def restore_variables(workdir: str | pathlib.Path, abstract_variables: Any,
                      which: str = 'latest') -> tuple[Any, int]:
  """Restores the model variables of a checkpoint: (variables, step).

  Leaves of `abstract_variables` without a sharding are restored replicated
  over all current devices, whatever devices the checkpoint was saved from.
  """
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ('devices',)),
      jax.sharding.PartitionSpec())
  abstract_variables = jax.tree.map(
      lambda x: x if getattr(x, 'sharding', None) is not None else
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      abstract_variables)
  with create_manager(workdir, read_only=True) as manager:
    step = select_step(manager, which)
    restored = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract_variables)))
  return restored['variables'], step
