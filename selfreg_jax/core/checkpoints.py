"""Orbax checkpoints of a run: `WORKDIR/checkpoints/<step>/<item>`.

Items of a step:
  variables: the model variables {'params': ..., 'batch_stats': ...} (all that
    evaluation needs; a converted PyTorch checkpoint holds only this);
  train: the rest of the train state (step, optimizer state);
  data: the grain iterator state of this process (training only);
  loop: the training loop's own state as JSON (training only; see
    `train.LoopState`);
  config: the run's ConfigDict as JSON;
  checksums: {item: {array path: CRC-32 of its bytes}} of the array items
    ('variables', 'train'), written with them in the same atomic step.
Validation Dice, when known, is stored as the step's metric so that the best
checkpoint is kept besides the last N.

Orbax (0.12.8) keeps no checksum of array data (zarr3 checksums only its
shard index), so bit flips in a weight file would load silently; restoring
recomputes the CRC-32 of every restored array and compares. A step that does
not restore (a missing item, a truncated or garbled file, a checksum
mismatch, a NaN or Inf) raises `CheckpointError` in one line. Training
resumes from the newest step that restores and moves the newer ones to
`checkpoints/corrupt/<step>` (never deleting them); evaluation refuses such
a step.
"""

import functools
import logging as std_logging
import os
import pathlib
import re
import shutil
import sys
from typing import Any, Collection, Mapping, Sequence
import zlib

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from selfreg_jax.common import cli
from selfreg_jax.core import sharding

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt'
CHECKSUMS_ITEM = 'checksums'
BEST_METRIC = 'val_dice'
# Checkpoint choice 'epoch:N': the step ending the N-th epoch.
EPOCH_PREFIX = 'epoch:'
# Reasons quoted from orbax / TensorStore errors are cut to about this many
# characters (their messages can embed whole TensorStore specs).
_MAX_REASON_CHARS = 300
# TensorStore tags an OS failure with its errno, e.g. [os_error_code='27'].
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


class CheckpointError(Exception):
  """A checkpoint step that cannot be written or read back (one-line message).

  Attributes:
    step: the step concerned.
  """

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


@functools.cache
def _save_arrays_whole() -> None:
  """Makes one replica write each array whole (registered once, on first use).

  Orbax's default splits every replicated array over its replicas and
  compiles a slicing program per array shape (NOTES item 25), for states (at
  most a few hundred MB) that gain nothing from parallel writes. (This handler
  keeps no PRNG-key metadata; train states hold no keys.)
  """
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
      override=True)


def _is_abandoned_io(unraisable: Any) -> bool:
  """Whether an unraisable error comes from orbax I/O nobody awaits any more.

  When one read or write of a restore or save fails, orbax raises that
  failure and closes its event loop while TensorStore still completes the
  other reads and writes: each completion reports 'RuntimeError: Event loop
  is closed', and each coroutine of orbax's left unfinished reports its own
  error when collected (up to ~100 tracebacks, each with a whole TensorStore
  spec, after a single damaged file or a full disk).
  """
  if (isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'):
    return True
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


def _is_abandoned_task_report(record: std_logging.LogRecord) -> bool:
  """Whether a log record is asyncio's report of a failed orbax task.

  A task or future of orbax's that failed besides the failure orbax raises
  is never awaited; asyncio logs it with its traceback when it is collected
  ('Task exception was never retrieved' with the task's repr, which names
  the file of its coroutine, or 'Future exception was never retrieved' with
  the error, which names the step's temporary folder).
  """
  message = record.getMessage()
  return ('exception was never retrieved' in message
          and (f'{os.sep}orbax{os.sep}' in message
               or '.orbax-checkpoint-tmp' in message))


@functools.cache
def _ignore_abandoned_io() -> None:
  """Drops the unraisable errors of `_is_abandoned_io` and the asyncio log
  records of `_is_abandoned_task_report` (installed once).

  The failure behind them is raised as usual (and reported by this module
  in one line); other unraisable errors go to the previous hook, other
  asyncio records are logged as usual.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_io(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  std_logging.getLogger('asyncio').addFilter(
      lambda record: not _is_abandoned_task_report(record))


def create_manager(workdir: str | pathlib.Path, *, keep_last: int = 3,
                   keep_best: bool = True, keep_steps: Sequence[int] = (),
                   read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep_last` steps, the best one and
  `keep_steps` (e.g. the fixed epoch a protocol evaluates)."""
  _save_arrays_whole()
  _ignore_abandoned_io()
  policies = [checkpoint_managers.LatestN(keep_last)]
  if keep_steps:
    policies.append(checkpoint_managers.CustomSteps(list(keep_steps)))
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
      read_only=read_only, create=not read_only,
      # A rerun removes what saves cut short (a full disk, a kill) left.
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(_checkpoint_dir(workdir), options=options)


def _checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """The absolute folder of `workdir`'s checkpoints."""
  return pathlib.Path(workdir).absolute() / CHECKPOINT_DIR


def _missing_checkpoints_error(directory: str | pathlib.Path
                               ) -> FileNotFoundError:
  """The error of a command that needs a checkpoint in `directory`."""
  return FileNotFoundError(f'No checkpoint in {directory}: train first or '
                           'convert a PyTorch checkpoint into it.')


def has_checkpoints(workdir: str | pathlib.Path) -> bool:
  """Whether `workdir` holds at least one finished checkpoint step."""
  if not _checkpoint_dir(workdir).is_dir():
    return False
  with create_manager(workdir, read_only=True) as manager:
    return bool(manager.all_steps())


def require_checkpoints(workdir: str | pathlib.Path) -> None:
  """Raises FileNotFoundError unless `workdir` has a checkpoint."""
  if not has_checkpoints(workdir):
    raise _missing_checkpoints_error(_checkpoint_dir(workdir))


def _named_host_arrays(tree: Any) -> list[tuple[str, np.ndarray]]:
  """(path 'params/inc/kernel', host copy) of every array of `tree`.

  Arrays spread over several processes must be replicated (train states
  are): each process then copies its own replica.
  """
  leaves = jax.tree.leaves_with_path(tree)
  local = []
  for _, leaf in leaves:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        raise ValueError('checkpoints hold replicated arrays only; got one '
                         f'sharded as {leaf.sharding}')
      leaf = leaf.addressable_data(0)
    local.append(leaf)
  return [(jax.tree_util.keystr(path, simple=True, separator='/'),
           np.asarray(value))
          for (path, _), value in zip(leaves, jax.device_get(local))]


def _crc32(value: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(value).reshape(-1).view(np.uint8))


def _is_finite(value: np.ndarray) -> bool:
  return (not np.issubdtype(value.dtype, np.inexact)
          or bool(np.isfinite(value).all()))


def array_checksums(tree: Any) -> dict[str, int]:
  """{array path: CRC-32 of the array's bytes (C order)} of a pytree."""
  return {name: _crc32(value) for name, value in _named_host_arrays(tree)}


def nonfinite_arrays(tree: Any) -> list[str]:
  """Paths of the floating-point arrays of `tree` holding a NaN or Inf."""
  return [name for name, value in _named_host_arrays(tree)
          if not _is_finite(value)]


def save_args(arrays: Mapping[str, Any],
              **others: ocp.args.CheckpointArgs) -> ocp.args.Composite:
  """The Composite of a step: array items, their checksums and `others`.

  Args:
    arrays: item name -> pytree of (replicated) arrays, each saved as a
      StandardSave item.
    **others: item name -> save args of the other items.
  """
  checksums = {name: array_checksums(tree) for name, tree in arrays.items()}
  return ocp.args.Composite(
      **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
      **{CHECKSUMS_ITEM: ocp.args.JsonSave(checksums)}, **others)


def write_variables(workdir: str | pathlib.Path, variables: Any,
                    config: ml_collections.ConfigDict, step: int = 0) -> None:
  """Saves model variables (and the config) alone, e.g. after a conversion."""
  with create_manager(workdir, keep_best=False) as manager:
    manager.save(step, args=save_args(
        {'variables': variables}, config=ocp.args.JsonSave(config.to_dict())),
                 force=True)
    manager.wait_until_finished()


def _reason(error: BaseException) -> str:
  """The first line of an error's root cause, cut short, for one-line reports,
  led by the OS's reason where TensorStore gives its error code.

  The root cause is the most precise: orbax wraps TensorStore's 'Requested
  byte range [399747, 403996) is not valid for value of size 270578' into
  'Encountered error while reading array index ...' plus a whole spec.
  """
  while error.__cause__ is not None or (
      error.__context__ is not None and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  message = str(error).strip()
  lines = message.splitlines()
  text = f'{type(error).__name__}: {lines[0] if lines else ""}'
  if len(text) > _MAX_REASON_CHARS:
    half = _MAX_REASON_CHARS // 2
    text = f'{text[:half]} ... {text[-half:]}'
  # TensorStore puts the OS's words after two long paths, where the cut may
  # lose them; an OSError's message starts with them already.
  code = _OS_ERROR_CODE.search(message)
  if code:
    return f'{os.strerror(int(code.group(1)))} ({text})'
  return text


def _restore_item(manager: ocp.CheckpointManager, step: int, name: str,
                  args: ocp.args.CheckpointArgs, *, where: str,
                  required: bool = True) -> Any | None:
  """One item of a step (None for a missing optional one, e.g. of a step
  saved before that item existed).

  Raises:
    CheckpointError: the item does not restore; the message names it.
  """
  try:
    return manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
  except KeyError as e:  # Orbax: 'Item "<name>" was not found ...'
    if required:
      raise CheckpointError(f'{where} does not restore: its {name!r} item '
                            'is missing', step) from e
    return None
  except Exception as e:  # pylint: disable=broad-except
    # Orbax, TensorStore and the JSON / grain readers raise every kind of
    # exception (ValueError, plain Exception, ...) for a bad file.
    raise CheckpointError(f'{where} does not restore: its {name!r} item: '
                          f'{_reason(e)}', step) from e


def short_list(names: Sequence[str], count: int = 3) -> str:
  """The first `count` names, comma-separated, then '...' if there are more."""
  return ', '.join(names[:count]) + (', ...' if len(names) > count else '')


def _check_restored(where: str, step: int, restored: Mapping[str, Any],
                    saved: Mapping[str, Mapping[str, int]] | None) -> None:
  """Raises CheckpointError if restored arrays differ from their saved
  checksums (steps saved without checksums are not compared) or hold a NaN
  or Inf (no intact checkpoint does: saving refuses them)."""
  mismatches, nonfinite = [], []
  for item, tree in restored.items():
    for path, value in _named_host_arrays(tree):
      if saved is not None and saved.get(item, {}).get(path) != _crc32(value):
        mismatches.append(f'{item}/{path}')
      if not _is_finite(value):
        nonfinite.append(f'{item}/{path}')
  if mismatches:
    raise CheckpointError(
        f'{where} is damaged: {len(mismatches)} array(s) differ from the '
        f'checksums saved with them ({short_list(mismatches)})', step)
  if nonfinite:
    raise CheckpointError(
        f'{where} holds NaN or Inf in {len(nonfinite)} array(s) '
        f'({short_list(nonfinite)})', step)


def restore_step(manager: ocp.CheckpointManager, step: int,
                 arrays: Mapping[str, Any],
                 optional: Sequence[str] = (),
                 **others: ocp.args.CheckpointArgs) -> dict[str, Any]:
  """Restores a step and checks its arrays against their saved checksums.

  Args:
    manager: the run's manager.
    step: the step to restore.
    arrays: item name -> abstract pytree (ShapeDtypeStructs with shardings)
      of each array item to restore.
    optional: names of JSON items restored when the step has them (missing
      from the result otherwise).
    **others: item name -> restore args of further items (all required).

  Returns:
    item name -> restored item.

  Raises:
    CheckpointError: the step does not restore as saved (a missing item, an
      unreadable file, a checksum mismatch, or arrays of other shapes than
      `arrays`: a different model or optimizer) or holds a NaN or Inf; the
      message says which in one line. Steps saved without checksums are
      not compared.
  """
  where = f'Checkpoint step {step} in {manager.directory}'
  restored = {name: _restore_item(manager, step, name,
                                  ocp.args.StandardRestore(abstract),
                                  where=where)
              for name, abstract in arrays.items()}
  for name, args in others.items():
    restored[name] = _restore_item(manager, step, name, args, where=where)
  for name in optional:
    item = _restore_item(manager, step, name, ocp.args.JsonRestore(),
                         where=where, required=False)
    if item is not None:
      restored[name] = item
  saved = _restore_item(manager, step, CHECKSUMS_ITEM, ocp.args.JsonRestore(),
                        where=where, required=False)
  _check_restored(where, step, {name: restored[name] for name in arrays},
                  saved)
  return restored


def _all_processes_agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective in multi-process)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.array(ok)).all())


def move_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Moves a damaged step to `checkpoints/corrupt/<step>` (never deletes it).

  Process 0 moves (a second damaged copy of a step gets `<step>.1`, ...);
  every process then waits for it and rereads the steps.

  Returns:
    Where the step now lies.
  """
  corrupt = pathlib.Path(manager.directory) / CORRUPT_DIR
  target = corrupt / str(step)
  copies = 0
  while target.exists():
    copies += 1
    target = corrupt / f'{step}.{copies}'
  if jax.process_count() > 1:  # Every process has chosen the same target.
    multihost_utils.sync_global_devices(f'moving checkpoint step {step}')
  if jax.process_index() == 0:
    corrupt.mkdir(exist_ok=True)
    # Orbax names a step's folder by its number alone (the default format).
    shutil.move(pathlib.Path(manager.directory) / str(step), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'moved checkpoint step {step}')
  manager.reload()
  return target


def restore_newest_intact(manager: ocp.CheckpointManager,
                          arrays: Mapping[str, Any],
                          optional: Sequence[str] = (),
                          **others: ocp.args.CheckpointArgs
                          ) -> tuple[int, dict[str, Any]] | None:
  """Restores the newest step that restores intact (see `restore_step`).

  Steps are tried from the newest down. Once one restores, each newer one is
  reported in one warning line and moved aside (`move_aside`). A step fails
  for every process when any process fails on it, so all processes resume
  from the same step. When no step restores, nothing is moved: a config that
  no longer matches the run's checkpoints fails the same way as damage of
  every step, and the newest step's error is raised.

  (A failure inside orbax's restore on some processes only, e.g. a damaged
  data-iterator file of one process, would stop at orbax's own barrier at
  the end of the restore; files shared by all processes fail for all.)

  Returns:
    (step, restored items), or None when there is no checkpoint.

  Raises:
    CheckpointError: no step restores.
  """
  failures = []
  for step in reversed(manager.all_steps()):
    try:
      restored = restore_step(manager, step, arrays, optional, **others)
      error = None
    except CheckpointError as e:
      error = e
    if not _all_processes_agree(error is None):
      failures.append(error or CheckpointError(
          f'Checkpoint step {step} in {manager.directory} does not restore '
          'on another process', step))
      continue
    for failure in failures:
      logging.warning('%s; moved to %s.', failure,
                      move_aside(manager, failure.step))
    return step, restored
  if failures:
    raise CheckpointError(
        f'{failures[0]}. No checkpoint of the run restores (tried steps '
        f'{", ".join(str(f.step) for f in failures)}): restore the config '
        'the run was started with, or move the damaged steps away.',
        failures[0].step)
  return None


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; a failed one raises in one line.

  Raises:
    CheckpointError: the save failed (e.g. on a full disk); the message
      names the step and the cause.
  """
  step = manager.latest_step()
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'Saving checkpoint step {step} in {manager.directory} failed: '
        f'{_reason(e)}. Stopping; free disk space (or fix the cause) and '
        'rerun the same command to resume from the last saved step.',
        step) from e


def close(manager: ocp.CheckpointManager) -> None:
  """Closes a manager whose saves `wait_for_saves` has already reported.

  Orbax raises a failed save's error again on every later wait; that error
  has been reported (or another one is on its way), so it is not raised
  twice.
  """
  try:
    manager.close()
  except Exception:  # pylint: disable=broad-except
    pass


def selected_epoch(which: str) -> int | None:
  """N of a checkpoint choice 'epoch:N' (after N whole epochs), else None.

  Raises:
    UserError: 'epoch:' followed by anything but a number >= 1.
  """
  if not which.startswith(EPOCH_PREFIX):
    return None
  number = which[len(EPOCH_PREFIX):]
  if not number.isdigit() or int(number) < 1:
    raise cli.UserError(f'checkpoint {which!r}: write {EPOCH_PREFIX}N with '
                        'N >= 1 whole epochs.')
  return int(number)


def select_step(manager: ocp.CheckpointManager, which: str,
                steps_per_epoch: int | None = None) -> int:
  """The step to evaluate: 'latest', 'best', 'epoch:N' or a step number.

  'best' is the step with the highest validation Dice; a run never
  validated (e.g. a converted checkpoint) has none, and gets its latest step.
  'epoch:N' is step N * steps_per_epoch, the end of the N-th epoch.
  """
  steps = manager.all_steps()
  if not steps:
    raise _missing_checkpoints_error(manager.directory)
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    best = manager.best_step()
    return manager.latest_step() if best is None else best
  epoch = selected_epoch(which)
  if epoch is not None:
    if steps_per_epoch is None:
      raise ValueError(f'checkpoint {which!r} needs steps_per_epoch.')
    if epoch * steps_per_epoch in steps:
      return epoch * steps_per_epoch
    raise cli.UserError(
        f'checkpoint {which!r} (step {epoch} x {steps_per_epoch} = '
        f'{epoch * steps_per_epoch}) not found in {manager.directory}; it '
        f'holds steps {sorted(steps)}.')
  if which.isdigit() and int(which) in steps:
    return int(which)
  raise cli.UserError(
      f'checkpoint {which!r} not found in {manager.directory}; '
      f"choose 'latest', 'best' or one of {sorted(steps)}.")


def stored_config(workdir: str | pathlib.Path,
                  which: str = 'latest') -> ml_collections.ConfigDict | None:
  """The config saved with a checkpoint of a run ('latest', 'best' or a step
  number), JSON's lists back to tuples as configs hold them; None when that
  step holds none (e.g. saved by an old version).

  Raises:
    FileNotFoundError: the run has no checkpoint.
    CheckpointError: the config does not restore (damaged).
  """
  with create_manager(workdir, read_only=True) as manager:
    step = select_step(manager, which)
    restored = restore_step(manager, step, {}, optional=('config',))
  if 'config' not in restored:
    return None
  return ml_collections.ConfigDict(_as_config_value(restored['config']))


def _as_config_value(value: Any) -> Any:
  """JSON's lists back to the tuples configs hold (comparable, hashable),
  inside nested dicts too."""
  if isinstance(value, dict):
    return {key: _as_config_value(inner) for key, inner in value.items()}
  if isinstance(value, list):
    return tuple(map(_as_config_value, value))
  return value


def with_stored_model(config: ml_collections.ConfigDict,
                      stored: ml_collections.ConfigDict | None,
                      workdir: str | pathlib.Path,
                      overridden: Collection[str] = ()
                      ) -> ml_collections.ConfigDict:
  """`config` with the model the run's checkpoints were saved with.

  Evaluating a run needs its model's shape, which the config file may not
  give (e.g. a run trained with `--config.model.widths=...`): config.model
  becomes the saved model config, and so does config.dataset.image_size, the
  size that model was trained at, unless overridden.

  Args:
    config: the config of the command.
    stored: `stored_config(workdir)` (a run's model is the same at every
      step: resuming restores them); None leaves `config` as it is.
    workdir: the run's folder (named in messages).
    overridden: dotted keys the user set on the command line (e.g.
      'model.embed_dim'); an overridden model field must equal the saved one.

  Raises:
    UserError: an overridden model field differs from the saved one (one
      line naming the field and both values).
  """
  if stored is None or 'model' not in stored:
    logging.warning('%s: the latest checkpoint holds no config; using '
                    'config.model as given.', workdir)
    return config
  saved = stored.model.to_dict()
  given = _as_config_value(config.model.to_dict())
  for key in sorted(set(saved) | set(given)):
    if f'model.{key}' in overridden and given.get(key) != saved.get(key):
      raise cli.UserError(
          f'--config.model.{key}={given.get(key)!r} differs from the model '
          f'the checkpoints in {workdir} were saved with ({key}='
          f'{saved.get(key)!r}); drop the override to use that model.')
  differing = [key for key in sorted(set(saved) | set(given))
               if given.get(key) != saved.get(key)]
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model = ml_collections.ConfigDict(saved)
    if ('dataset.image_size' not in overridden
        and 'image_size' in stored.get('dataset', {})):
      config.dataset.image_size = stored.dataset.image_size
  if differing:
    logging.info('Using the model of the checkpoints in %s: %s (the config '
                 'gives %s).', workdir,
                 ', '.join(f'{k}={saved.get(k)!r}' for k in differing),
                 ', '.join(f'{k}={given.get(k)!r}' for k in differing))
  return config


def restore_variables(workdir: str | pathlib.Path, abstract_variables: Any,
                      which: str = 'latest',
                      steps_per_epoch: int | None = None) -> tuple[Any, int]:
  """Restores the model variables of a checkpoint: (variables, step).

  `which` is a choice of `select_step`. The variables are restored with the
  shardings of `abstract_variables` (e.g. `RunContext.abstract_variables`);
  leaves without one are restored replicated over the data mesh of all
  current devices, whatever devices the checkpoint was saved from.

  Raises:
    CheckpointError: the selected step does not restore intact; it is
      named, with the reason and the other steps, and nothing else is
      restored in its place.
  """
  replicated = sharding.replicated_sharding(sharding.data_mesh())
  abstract_variables = jax.tree.map(
      lambda x: x if getattr(x, 'sharding', None) is not None else
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      abstract_variables)
  with create_manager(workdir, read_only=True) as manager:
    step = select_step(manager, which, steps_per_epoch)
    try:
      restored = restore_step(manager, step,
                              {'variables': abstract_variables})
    except CheckpointError as e:
      others = [s for s in manager.all_steps() if s != step]
      raise CheckpointError(
          f'{e} (selected as {which!r}; not evaluated; other steps: '
          f'{others or "none"})', step) from e
  return restored['variables'], step
