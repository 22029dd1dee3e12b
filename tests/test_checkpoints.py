"""Checkpoints: replicated arrays saved without compiling anything; the best
step is the best by validation Dice; damaged steps are found and passed over.

Orbax's default array handler splits each replicated array over its replicas
and compiles a slicing program per array shape (152 compiles, 7.6 s, on the
first save of a tiny Swin-UNet over 8 CPU devices); `checkpoints` turns that
off. The save runs in a subprocess with 8 simulated CPU devices, the only way
to get several devices (the device count is fixed when JAX starts).

The damage tests save two steps laid out as a training run's (array items,
their checksums, a grain iterator, a JSON item), damage the newer one on
disk, and expect the older one back, as it was saved.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_train_config
from selfreg_jax.core import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8
# Distinct shapes, as a model's parameters have: the slicing programs were
# compiled once per shape.
SHAPES = {'kernel': (3, 3, 2, 8), 'bias': (8,), 'dense': (16, 8),
          'scale': (5,)}

_SCRIPT = """
import json, sys
import jax
import ml_collections
import numpy as np
from jax import monitoring
from selfreg_jax.core import checkpoints

workdir, shapes = sys.argv[1], json.loads(sys.argv[2])
compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: compiles.append(kwargs.get('fun_name'))
    if event == '/jax/core/compile/backend_compile_duration' else None)
replicated = jax.sharding.NamedSharding(
    jax.sharding.Mesh(jax.devices(), ('data',)), jax.sharding.PartitionSpec())
values = {name: np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
          for name, shape in shapes.items()}
variables = {'params': {name: jax.device_put(value, replicated)
                        for name, value in values.items()}}
checkpoints.write_variables(workdir, variables,
                            ml_collections.ConfigDict({'seed': 0}), step=7)
save_compiles = list(compiles)
restored, step = checkpoints.restore_variables(
    workdir, jax.eval_shape(lambda: variables))
print(json.dumps({
    'devices': jax.device_count(), 'save_compiles': save_compiles,
    'step': step,
    'equal': all(np.array_equal(np.asarray(restored['params'][name]), value)
                 for name, value in values.items()),
    'restored_devices': sorted({len(leaf.sharding.device_set)
                                for leaf in jax.tree.leaves(restored)})}))
"""


def test_saving_replicated_arrays_compiles_nothing_and_restores_them(
    tmp_path):
  env = dict(os.environ, XLA_FLAGS=(
      os.environ.get('XLA_FLAGS', '') +
      f' --xla_force_host_platform_device_count={DEVICES}'))
  run = subprocess.run(
      [sys.executable, '-c', _SCRIPT, str(tmp_path / 'run'),
       json.dumps(SHAPES)],
      env=env, capture_output=True, text=True, timeout=300, check=False,
      cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result['devices'] == DEVICES
  assert result['save_compiles'] == []
  assert result['step'] == 7
  assert result['equal'] is True
  assert result['restored_devices'] == [DEVICES]


def test_best_is_the_step_with_the_highest_validation_dice(tmp_path):
  """Saves whose validation Dice goes down: 'best' is the first, which the
  retention policy keeps besides the last one; 'latest' is the last."""
  variables = {'params': {'w': jax.numpy.zeros(3)}}
  dice_by_step = {1: 0.9, 2: 0.1, 3: 0.2}
  with checkpoints.create_manager(tmp_path, keep_last=1) as manager:
    for step, dice in dice_by_step.items():
      manager.save(step, args=ocp.args.Composite(
          variables=ocp.args.StandardSave(variables)),
                   metrics={checkpoints.BEST_METRIC: dice}, force=True)
    manager.wait_until_finished()
  with checkpoints.create_manager(tmp_path, read_only=True) as manager:
    assert manager.all_steps() == [1, 3]
    assert checkpoints.select_step(manager, 'best') == 1
    assert checkpoints.select_step(manager, 'latest') == 3
  _, step = checkpoints.restore_variables(
      tmp_path, jax.eval_shape(lambda: variables), which='best')
  assert step == 1


# A weight large enough that zstd keeps most of its bytes as they are: bytes
# flipped in the middle of its data file then decode without an error.
WEIGHT_SHAPE = (128, 128)
FLIPPED_BYTES = 64
STEPS = (1, 2)


def _state(step: int) -> dict:
  """The array items of a step: distinct random values per step."""
  rng = np.random.default_rng(step)
  return {'variables': {'params': {
      'kernel': rng.standard_normal(WEIGHT_SHAPE).astype(np.float32),
      'bias': rng.standard_normal(WEIGHT_SHAPE[-1]).astype(np.float32)}},
          'train': {'step': np.int32(step),
                    'mu': rng.standard_normal(WEIGHT_SHAPE[-1]).astype(
                        np.float32)}}


def _data_iterator(position: int = 0):
  """A grain iterator (over 0, 1, 2, ...) that has yielded `position` items."""
  iterator = iter(grain.MapDataset.range(len(STEPS) + 2).to_iter_dataset())
  for _ in range(position):
    next(iterator)
  return iterator


def _save_steps(workdir) -> dict[int, dict]:
  """Saves STEPS as a training run does; the later the step, the better its
  validation Dice. Returns the saved array items by step."""
  states = {step: _state(step) for step in STEPS}
  with checkpoints.create_manager(workdir) as manager:
    for step, state in states.items():
      manager.save(step, args=checkpoints.save_args(
          state, data=grain.checkpoint.CheckpointSave(_data_iterator(step)),
          loop=ocp.args.JsonSave({'step': step})),
                   metrics={checkpoints.BEST_METRIC: step / 10}, force=True)
    manager.wait_until_finished()
  return states


def _abstract(tree, widen: int = 1):
  """Shapes of a tree's arrays (the last axis `widen` times as long),
  replicated over all devices, as training restores its state."""
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(jax.devices(), ('devices',)),
      jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape[:-1] + (widen * x.shape[-1],) if x.ndim else x.shape, x.dtype,
      sharding=replicated), tree)


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(f.relative_to(directory)): f.read_bytes()
          for f in sorted(directory.rglob('*')) if f.is_file()}


def weight_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest data file of the step's variables (the weight's bytes)."""
  return max((f for f in (step_dir / 'variables').rglob('*') if f.is_file()),
             key=lambda f: f.stat().st_size)


def flip_bytes(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for i in range(middle - FLIPPED_BYTES // 2, middle + FLIPPED_BYTES // 2):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _empty(step_dir: pathlib.Path) -> None:
  for child in step_dir.iterdir():
    shutil.rmtree(child) if child.is_dir() else child.unlink()


# Damage done to the newest step -> what its one-line warning must say.
DAMAGE = {
    'missing variables': (lambda d: shutil.rmtree(d / 'variables'),
                          "'variables' item is missing"),
    'missing train': (lambda d: shutil.rmtree(d / 'train'),
                      "'train' item is missing"),
    'emptied step folder': (_empty, 'item is missing'),
    'truncated weight file': (lambda d: _truncate(weight_file(d)),
                              "'variables' item"),
    'garbage weight file': (
        lambda d: weight_file(d).write_bytes(
            np.random.default_rng(0).bytes(weight_file(d).stat().st_size)),
        "'variables' item"),
    'flipped bytes': (lambda d: flip_bytes(weight_file(d)),
                      'differ from the checksums saved with them'),
    'truncated manifest.ocdbt': (
        lambda d: _truncate(d / 'variables' / 'manifest.ocdbt'),
        "'variables' item"),
    'garbled data-iterator JSON': (
        lambda d: next((d / 'data').glob('*.json')).write_text('{"next_ind'),
        "'data' item"),
}


@pytest.mark.parametrize('damage', DAMAGE)
def test_resume_passes_over_a_damaged_newest_step(tmp_path, caplog, damage):
  """The older step comes back as saved (arrays, iterator, JSON item); the
  damaged one is named in one warning line and moved aside, unchanged."""
  states = _save_steps(tmp_path)
  newest = tmp_path / checkpoints.CHECKPOINT_DIR / str(STEPS[-1])
  damage_fn, reason = DAMAGE[damage]
  damage_fn(newest)
  damaged_files = _files(newest)
  iterator = _data_iterator()
  with checkpoints.create_manager(tmp_path) as manager:
    with caplog.at_level(logging.WARNING):
      step, restored = checkpoints.restore_newest_intact(
          manager, _abstract(states[STEPS[0]]), optional=('loop',),
          data=grain.checkpoint.CheckpointRestore(iterator))
    assert manager.all_steps() == [STEPS[0]]
  assert step == STEPS[0]
  for name, tree in states[step].items():
    jax.tree.map(np.testing.assert_array_equal, restored[name], tree)
  assert restored['loop'] == {'step': step}
  assert next(iterator) == step
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and 'Checkpoint step' in
              r.getMessage()]
  assert len(warnings) == 1 and '\n' not in warnings[0]
  assert f'step {STEPS[-1]} ' in warnings[0] and reason in warnings[0]
  moved = tmp_path / checkpoints.CHECKPOINT_DIR / checkpoints.CORRUPT_DIR / str(
      STEPS[-1])
  assert f'moved to {moved}' in warnings[0]
  assert _files(moved) == damaged_files


def test_flipped_bytes_that_orbax_reads_silently_are_refused_for_evaluation(
    tmp_path):
  """Orbax alone restores the flipped weight without a word; evaluation of
  'best' or 'latest' (here both the newest step) names the damaged step and
  restores nothing else in its place, moving nothing."""
  states = _save_steps(tmp_path)
  newest = tmp_path / checkpoints.CHECKPOINT_DIR / str(STEPS[-1])
  flip_bytes(weight_file(newest))
  abstract_variables = _abstract(states[STEPS[-1]]['variables'])
  with checkpoints.create_manager(tmp_path, read_only=True) as manager:
    silent = manager.restore(STEPS[-1], args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract_variables)))
  assert not np.array_equal(silent['variables']['params']['kernel'],
                            states[STEPS[-1]]['variables']['params']['kernel'])
  for which in ('best', 'latest'):
    with pytest.raises(checkpoints.CheckpointError) as error:
      checkpoints.restore_variables(tmp_path, abstract_variables, which)
    message = str(error.value)
    assert f'step {STEPS[-1]} ' in message and f'{which!r}' in message
    assert 'checksums' in message and '\n' not in message
  assert sorted(p.name for p in newest.parent.iterdir()) == [
      str(step) for step in STEPS]


def test_a_config_that_matches_no_step_moves_nothing(tmp_path):
  """Every step failing is not damage of every step: nothing is moved."""
  states = _save_steps(tmp_path)
  with checkpoints.create_manager(tmp_path) as manager:
    with pytest.raises(checkpoints.CheckpointError,
                       match='No checkpoint of the run restores'):
      checkpoints.restore_newest_intact(
          manager, _abstract(states[STEPS[0]], widen=2))
    assert manager.all_steps() == list(STEPS)
  assert not (tmp_path / checkpoints.CHECKPOINT_DIR /
              checkpoints.CORRUPT_DIR).exists()


def test_a_nonfinite_step_saved_without_checksums_is_passed_over(tmp_path):
  """Steps saved before checksums existed restore unchecked, but a NaN state
  (which older versions could save) is passed over."""
  states = {step: _state(step) for step in STEPS}
  states[STEPS[-1]]['variables']['params']['bias'][0] = np.nan
  with checkpoints.create_manager(tmp_path) as manager:
    for step, state in states.items():
      manager.save(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardSave(tree) for name, tree in state.items()}
      ), force=True)
    manager.wait_until_finished()
  with checkpoints.create_manager(tmp_path) as manager:
    step, restored = checkpoints.restore_newest_intact(
        manager, _abstract(states[STEPS[0]]))
  assert step == STEPS[0]
  for name, tree in states[step].items():
    jax.tree.map(np.testing.assert_array_equal, restored[name], tree)
  assert (tmp_path / checkpoints.CHECKPOINT_DIR / checkpoints.CORRUPT_DIR /
          str(STEPS[-1])).is_dir()


@pytest.mark.parametrize('message, abandoned', [
    ('Task exception was never retrieved\nfuture: <Task finished coro=<f() '
     'done, defined at /venv/orbax/checkpoint/x.py:1> exception=OSError()>',
     True),
    ('Future exception was never retrieved\nfuture: <Future finished '
     "exception=ValueError('Error writing \"a/0\" at local file "
     "\"run/checkpoints/15.orbax-checkpoint-tmp/train\"')>", True),
    ('Future exception was never retrieved\nfuture: <Future finished '
     "exception=ValueError('elsewhere')>", False),
])
def test_only_orbax_abandoned_writes_are_kept_out_of_the_log(message,
                                                             abandoned):
  record = logging.LogRecord('asyncio', logging.ERROR, __file__, 1, message,
                             None, None)
  # pylint: disable-next=protected-access
  assert checkpoints._is_abandoned_task_report(record) == abandoned


def test_the_stored_config_equals_the_saved_one_tuples_included(tmp_path):
  """JSON stores tuples as lists; the config read back holds tuples again,
  as the saved one did (comparable with a config file's, hashable)."""
  config = tiny_train_config.get_config('swin_unet')
  config.eval.overlay_cases = (('case0001', 3), 'case0002')
  checkpoints.write_variables(tmp_path, {'params': {'w': np.zeros(2)}},
                              config, step=5)
  assert checkpoints.stored_config(tmp_path).to_dict() == config.to_dict()


_WRITE_PAST_FILE_SIZE_LIMIT = """
import signal, sys
import numpy as np
import tensorstore as ts
from selfreg_jax.core import checkpoints
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
try:
  store = ts.open({'driver': 'zarr3',
                   'kvstore': {'driver': 'file', 'path': sys.argv[1]},
                   'metadata': {'shape': [1 << 20], 'data_type': 'float32'}},
                  create=True).result()
  store.write(np.ones(1 << 20, np.float32)).result()
except ValueError as e:
  print(checkpoints._reason(e))  # pylint: disable=protected-access
"""


def test_a_failed_write_is_reported_by_the_os_reason_first(tmp_path):
  """The report starts with the OS's reason, whatever the cut to one line
  keeps of TensorStore's long message (a CI run's report once lost it)."""
  path = tmp_path / ('deep' * 40) / ('er' * 60)
  run = subprocess.run(
      ['prlimit', '--fsize=65536', sys.executable, '-c',
       _WRITE_PAST_FILE_SIZE_LIMIT, str(path)],
      capture_output=True, text=True, cwd=ROOT, check=True, timeout=300)
  assert run.stdout.startswith(f'{os.strerror(27)} ('), run.stdout
