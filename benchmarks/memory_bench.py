"""Suite `memory`: the largest train-step batch that fits, from XLA's plan.

Compile-only. For every model and dtype, the SelfReg train step of the
`train_step` suite (224 px, state donated, one device) is compiled at batch
4, 8, 16, ... until XLA's memory plan of the step (`timing.compiled_memory`:
temp + argument + output bytes, the donated state counted once) exceeds the
device's memory (`timing.device_memory_bytes`: an accelerator's limit, the
host's physical memory on CPU). One record per batch (the plan, and the plan
divided by the batch), then one per model and dtype: the largest batch that
fits, and the plan as a straight line through the two largest batches that
fit, fixed_bytes + batch x marginal_bytes_per_image (the state and per-step
constants, and what each image adds).

The plan depends on the backend and its flags: run through `benchmarks.run`,
the process has `main.py`'s settings (`runtime.prepare_process`: on CPU,
XLA's memory-minimising schedule). Smoke: the smoke models, batches 2 and 4
only, whatever they take.
"""

from typing import Any, Iterator, Sequence

from benchmarks import model_setup
from benchmarks import settings as settings_lib
from benchmarks import timing
from benchmarks import train_step_bench

SUITE = 'memory'
FIRST_BATCH = 4
SMOKE_BATCHES = 2  # batch sizes compiled in a smoke run


def _batch_record(name: str, batch_size: int, dtype: str, limit: int,
                  settings: settings_lib.Settings) -> dict[str, Any]:
  step = train_step_bench.compiled_step(name, batch_size, dtype, True,
                                        settings)
  memory = timing.compiled_memory(step.compiled.executable)
  return {'suite': SUITE, **model_setup.describe(step.setup.config),
          'batch': batch_size, 'compile_s': step.compiled.compile_s,
          'xla_memory': memory,
          'bytes_per_image': memory['total_bytes'] / batch_size,
          'memory_limit_bytes': limit,
          'fits': memory['total_bytes'] <= limit}


def _largest_record(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The summary of one model and dtype's batch records (by batch)."""
  fitting = [r for r in records if r['fits']]
  summary = {key: records[0][key] for key in
             ('suite', 'model', 'image_size', 'dtype', 'memory_limit_bytes')}
  summary.update(largest_fitting_batch=None, total_bytes=None,
                 marginal_bytes_per_image=None, fixed_bytes=None)
  if fitting:
    largest = fitting[-1]
    summary.update(largest_fitting_batch=largest['batch'],
                   total_bytes=largest['xla_memory']['total_bytes'])
  if len(fitting) >= 2:
    (small, large) = fitting[-2:]
    per_image = ((large['xla_memory']['total_bytes']
                  - small['xla_memory']['total_bytes'])
                 / (large['batch'] - small['batch']))
    summary.update(marginal_bytes_per_image=per_image,
                   fixed_bytes=(large['xla_memory']['total_bytes']
                                - per_image * large['batch']))
  return summary


def measurements(settings: settings_lib.Settings,
                 earlier: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  """Batch records by doubling, then the summary, per model and dtype."""
  del earlier  # independent of other suites
  limit = timing.device_memory_bytes()
  for name in settings.models:
    for dtype in settings.dtypes:
      batch_size = settings_lib.SMOKE_BATCH if settings.smoke else FIRST_BATCH
      records = []
      while True:
        record = _batch_record(name, batch_size, dtype, limit, settings)
        records.append(record)
        yield record
        if (len(records) == SMOKE_BATCHES if settings.smoke
            else not record['fits']):
          break
        batch_size *= 2
      yield _largest_record(records)


def summary_line(record: dict[str, Any]) -> str:
  head = f"{record['model']:9s} {record['image_size']}px {record['dtype']:8s}"
  if 'batch' in record:
    return (f"{head} batch {record['batch']:<4d}: XLA plan "
            f"{timing.format_bytes(record['xla_memory']['total_bytes'])} "
            f"({timing.format_bytes(record['bytes_per_image'])} per image)"
            f"{'' if record['fits'] else ', over the device memory'}; "
            f"compile {record['compile_s']:.1f} s")
  if record['largest_fitting_batch'] is None:
    return f'{head}: no batch fits'
  line = (f"{head}: largest batch that fits "
          f"{timing.format_bytes(record['memory_limit_bytes'])}: "
          f"{record['largest_fitting_batch']} "
          f"({timing.format_bytes(record['total_bytes'])})")
  if record['marginal_bytes_per_image'] is not None:
    line += (f"; plan = {timing.format_bytes(record['fixed_bytes'])} + "
             f"{timing.format_bytes(record['marginal_bytes_per_image'])} per "
             "image")
  return line
