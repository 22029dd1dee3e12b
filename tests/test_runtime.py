"""The entry points' process setup (selfreg_jax.common.runtime): XLA:CPU's
memory-minimising schedule, the restart with glibc's malloc tunables, and
JAX's random-number scheme, set by the entry points and not by importing."""

import os
import pathlib
import subprocess
import sys

import pytest

from selfreg_jax.common import runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Prints the process id before and after the (possible) restart, and the
# tunables the process ended up with.
SCRIPT = '''
import os, sys
print('start', os.getpid(), flush=True)
from selfreg_jax.common import runtime
runtime.restart_with_malloc_tunables()
print('tunables', os.environ.get('GLIBC_TUNABLES'), os.getpid())
'''


def _run(script: str = SCRIPT, **env_changes) -> list[str]:
  """The lines `script` prints, run without our GLIBC_TUNABLES."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(env_changes, PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, '-c', script], env=env,
                          capture_output=True, text=True, timeout=60,
                          check=True)
  return result.stdout.split('\n')


def _glibc_with_tunable() -> bool:
  version = runtime._glibc_version()  # pylint: disable=protected-access
  return version is not None and version >= runtime.MIN_GLIBC


def test_restarts_once_in_place_with_the_tunables():
  lines = _run()
  pid = lines[0].split()[1]
  if _glibc_with_tunable():
    assert lines[:3] == [f'start {pid}', f'start {pid}',
                         f'tunables {runtime.MALLOC_TUNABLES} {pid}']
  else:
    assert lines[:2] == [f'start {pid}', f'tunables None {pid}']


def test_tunables_set_by_the_user_are_kept_and_nothing_restarts():
  for tunables in ('', 'glibc.malloc.hugetlb=0'):
    lines = _run(GLIBC_TUNABLES=tunables)
    pid = lines[0].split()[1]
    assert lines[:2] == [f'start {pid}', f'tunables {tunables} {pid}']


# Page faults of a second array of ARRAY_BYTES written after the first is freed:
# what a step pays when it maps fresh memory for its temporary buffer.
ARRAY_BYTES = 2 ** 28
REUSE_SCRIPT = f'''
import resource
import numpy as np
from selfreg_jax.common import runtime
runtime.restart_with_malloc_tunables()

def faults_writing_a_fresh_array():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  np.ones({ARRAY_BYTES} // 8)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_writing_a_fresh_array()
print('faults', faults_writing_a_fresh_array())
'''


def _second_array_faults(**env_changes) -> int:
  return int(_run(REUSE_SCRIPT, **env_changes)[0].split()[1])


@pytest.mark.skipif(not _glibc_with_tunable(),
                    reason='the tunables are set on glibc >= 2.35 only')
def test_the_tunables_hand_freed_memory_to_the_next_block():
  """With glibc's defaults a freed 256 MiB block goes back to the kernel and
  the next one is faulted in afresh; with the tunables malloc reuses it."""
  with_defaults = _second_array_faults(GLIBC_TUNABLES='')
  with_tunables = _second_array_faults()
  assert with_tunables * 10 < with_defaults, (with_tunables, with_defaults)


# The tiny UNet's train step at 64 px, batch 8: the size at which XLA:CPU's two
# schedules differ (at 32 px, batch 2, their buffers are the same size).
SCHEDULE_BATCH = 8
TEMP_BYTES_SCRIPT = '''
import functools, sys
from selfreg_jax.common import runtime
if sys.argv[1] == 'memory':
  runtime.schedule_for_memory()
import jax, optax
sys.path.insert(0, 'tests')
import tiny_configs, tiny_train_config
from selfreg_jax import train
from selfreg_jax.core.models import create_model
config = tiny_train_config.get_config('unet')
config.dataset.image_size = size = tiny_configs.IMAGE_SIZES[-1]
batch_size = int(sys.argv[2])
model, tx = create_model(config.model), optax.sgd(0.01)
state = train.initial_state(model, tx, config, jax.random.key(0))
channels = config.dataset.in_channels
batch = {'image': jax.numpy.zeros((batch_size, size, size, channels)),
         'label': jax.numpy.zeros((batch_size, size, size), 'int32')}
step = jax.jit(functools.partial(
    train.train_step, model=model, tx=tx,
    loss_config=dict(config.loss, use_selfreg=False),
    base_key=jax.random.key(1)))
print(step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)
'''


def _step_temp_bytes(schedules: tuple[str, ...]) -> list[int]:
  """The step's temporary bytes under each schedule, one process each (the
  flag is read when JAX starts), run side by side."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env['PYTHONPATH'] = str(ROOT)
  runs = [subprocess.Popen(
      [sys.executable, '-c', TEMP_BYTES_SCRIPT, schedule, str(SCHEDULE_BATCH)],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for schedule in schedules]
  temp_bytes = []
  for run in runs:
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    temp_bytes.append(int(stdout.split()[-1]))
  return temp_bytes


@pytest.mark.skipif(runtime.accelerator_plugin_installed(),
                    reason='the schedule is added on CPU-only machines')
def test_memory_schedule_shrinks_the_train_steps_temporary_buffer():
  # Measured: 97.9 MB with XLA:CPU's default schedule, 21.3 MB with it.
  default, memory = _step_temp_bytes(('default', 'memory'))
  assert memory < default / 2


def test_schedule_flag_is_added_once_and_a_users_choice_is_kept(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')
  runtime.schedule_for_memory()
  runtime.schedule_for_memory()
  assert os.environ['XLA_FLAGS'] == (
      f'--xla_backend_optimization_level=0 {runtime.MEMORY_SCHEDULER_FLAG}')
  users_choice = f'--{runtime.SCHEDULER_OPTION}=true'
  monkeypatch.setenv('XLA_FLAGS', users_choice)
  runtime.schedule_for_memory()
  assert os.environ['XLA_FLAGS'] == users_choice
  monkeypatch.delenv('XLA_FLAGS')
  runtime.schedule_for_memory()
  assert os.environ['XLA_FLAGS'] == runtime.MEMORY_SCHEDULER_FLAG


def test_schedule_flag_is_left_out_where_an_accelerator_plugin_is_installed(
    monkeypatch):
  monkeypatch.setattr(runtime, 'accelerator_plugin_installed',
                      lambda: True)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  runtime.schedule_for_memory()
  assert 'XLA_FLAGS' not in os.environ


# Prints jax_threefry_partitionable after importing the library, and after the
# entry points' configure_libraries (in this process and in a child).
THREEFRY_SCRIPT = '''
import subprocess, sys
import jax
from selfreg_jax import train  # noqa: F401  (the library's imports)
from selfreg_jax.common import runtime
print(jax.config.jax_threefry_partitionable)
runtime.configure_libraries()
print(jax.config.jax_threefry_partitionable)
child = 'import jax; print(jax.config.jax_threefry_partitionable)'
print(subprocess.run([sys.executable, '-c', child], capture_output=True,
                     text=True, check=True).stdout.strip())
'''


def test_importing_the_library_changes_no_setting_the_entry_points_do():
  """JAX's default (partitionable threefry, since jax 0.5) survives importing
  the library; configure_libraries selects the classic scheme, which the
  processes it starts inherit."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_THREEFRY_PARTITIONABLE', 'TF_ENABLE_ONEDNN_OPTS')}
  env['PYTHONPATH'] = str(ROOT)
  result = subprocess.run([sys.executable, '-c', THREEFRY_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120,
                          check=True)
  assert result.stdout.split() == ['True', 'False', 'False']
