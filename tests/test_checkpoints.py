"""Checkpoints: replicated arrays saved without compiling anything; the best
step is the best by validation Dice.

Orbax's default array handler splits each replicated array over its replicas
and compiles a slicing program per array shape (152 compiles, 7.6 s, on the
first save of a tiny Swin-UNet over 8 CPU devices); `checkpoints` turns that
off. The save runs in a subprocess with 8 simulated CPU devices, the only way
to get several devices (the device count is fixed when JAX starts).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import orbax.checkpoint as ocp

from selfreg_jax import checkpoints

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
from selfreg_jax import checkpoints

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
