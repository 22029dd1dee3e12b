"""Suite `train_step`: the jit-compiled training step, with and without SelfReg.

For every model, dtype and batch size: `selfreg_jax.train.train_step` jitted
as the training loop does (state donated), on a synthetic batch, on the
default device. Records the compile time, the median step time, images/s,
the mean step time of steps dispatched back to back (as the training loop
runs them: on a GPU the host's dispatch then overlaps the device's work),
XLA's FLOP count of the step and the GFLOP/s it reached, XLA's memory plan
and, where the device keeps statistics, its peak bytes in use; the SelfReg
record adds its overhead over the baseline step of the same model, batch and
dtype (from the median step times).
"""

import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from benchmarks import model_setup
from benchmarks import settings as settings_lib
from benchmarks import timing
from selfreg_jax import train

SUITE = 'train_step'
STEP_KEY_SEED = 2


class CompiledStep(NamedTuple):
  """A train step compiled for the arguments it is to run on."""
  setup: model_setup.ModelSetup
  compiled: timing.Compiled
  args: tuple[train.TrainState, dict[str, jax.Array]]  # (state, batch)


def compiled_step(name: str, batch_size: int, dtype: str, selfreg: bool,
                  settings: settings_lib.Settings) -> CompiledStep:
  setup = model_setup.model_setup(name, dtype, settings.smoke)
  step = jax.jit(functools.partial(
      train.train_step, model=setup.model, tx=setup.tx,
      loss_config=dict(setup.config.loss, use_selfreg=selfreg),
      base_key=jax.random.key(STEP_KEY_SEED)), donate_argnums=0)
  batch = model_setup.synthetic_batch(setup.config, batch_size)
  state = jax.tree.map(jnp.copy, setup.state)  # the step donates its state
  return CompiledStep(setup, timing.compile_jitted(step, state, batch),
                      (state, batch))


def _next_args(output, args):
  """The next step's (state, batch): the new state, the same batch."""
  return output[0], args[1]


def measure_pair(name: str, batch_size: int, dtype: str,
                 settings: settings_lib.Settings
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Baseline and SelfReg records of `name` at `batch_size` in `dtype`.

  The two steps take turns for `settings.runs` rounds, so that drifts of a
  shared machine hit both alike. In its turn a step runs twice and only the
  second run is timed: on XLA:CPU the first run after the other program ran
  is up to 1.5 s slower (measured, Swin-UNet batch 4), a cost a training
  loop, which repeats one program, does not pay. Then each runs
  `settings.runs` steps back to back (`back_to_back_s`, their mean).
  `system_s` and `steal_s` are the medians of the host's share of the timed
  steps (`timing.host_clock`).
  """
  steps = [compiled_step(name, batch_size, dtype, selfreg, settings)
           for selfreg in (False, True)]
  args = [step.args for step in steps]
  times, host = [[], []], [[], []]
  for _ in range(settings.runs):
    for index, step in enumerate(steps):
      for timed in (False, True):
        host_start = timing.host_clock()
        seconds, output = timing.timed_call(step.compiled.executable,
                                            *args[index])
        step_host = timing.host_seconds(host_start, timing.host_clock())
        args[index] = _next_args(output, args[index])
        if timed:
          times[index].append(seconds)
          host[index].append(step_host)
  back_to_back = []
  for index, step in enumerate(steps):
    seconds, args[index] = timing.back_to_back_seconds(
        step.compiled.executable, args[index], calls=settings.runs,
        next_args=_next_args)
    back_to_back.append(seconds)
  records = []
  for step, selfreg, runs, step_hosts, back_to_back_s in zip(
      steps, (False, True), times, host, back_to_back):
    step_s, flops = timing.median(runs), step.compiled.flops
    steals = [h.steal_s for h in step_hosts]
    records.append({
        'suite': SUITE, **model_setup.describe(step.setup.config),
        'batch': batch_size, 'selfreg': selfreg,
        'compile_s': step.compiled.compile_s,
        'median_s': step_s, 'runs_s': runs,
        'images_per_s': batch_size / step_s,
        'system_s': timing.median([h.system_s for h in step_hosts]),
        'steal_s': None if None in steals else timing.median(steals),
        'back_to_back_s': back_to_back_s,
        'back_to_back_images_per_s': batch_size / back_to_back_s,
        'gflop': None if flops is None else flops / 1e9,
        'gflop_per_s': None if flops is None else flops / 1e9 / step_s,
        'xla_memory': timing.compiled_memory(step.compiled.executable),
        'device_peak_bytes': timing.device_peak_bytes()})
  records[1]['selfreg_overhead_pct'] = 100 * (
      records[1]['median_s'] / records[0]['median_s'] - 1)
  return records[0], records[1]


def measurements(settings: settings_lib.Settings,
                 earlier: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  """Baseline then SelfReg step for every model, dtype and batch size."""
  del earlier  # independent of other suites
  for name in settings.models:
    for dtype in settings.dtypes:
      for batch_size in settings.batches:
        yield from measure_pair(name, batch_size, dtype, settings)


def summary_line(record: dict[str, Any]) -> str:
  memory = record['xla_memory'] or {}
  line = (f"{record['model']:9s} {record['image_size']}px batch "
          f"{record['batch']:<2d} {record['dtype']:8s} "
          f"{'selfreg ' if record['selfreg'] else 'baseline'}: compile "
          f"{record['compile_s']:6.1f} s, step {record['median_s']:.4f} s, "
          f"{record['images_per_s']:7.1f} images/s "
          f"({record['back_to_back_images_per_s']:.1f} back to back), "
          f"{record['gflop_per_s'] or float('nan'):8.1f} GFLOP/s, XLA memory "
          f"{timing.format_bytes(memory.get('total_bytes'))}, process peak "
          f"{timing.format_bytes(record['device_peak_bytes'])}, host per step "
          f"system {record['system_s']:.2f} s, steal "
          + ('n/a' if record['steal_s'] is None
             else f"{record['steal_s']:.2f} s"))
  if 'selfreg_overhead_pct' in record:
    line += f", SelfReg overhead {record['selfreg_overhead_pct']:+.1f}%"
  return line
