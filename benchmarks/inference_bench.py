"""Suite `inference`: slices/s of the evaluation predictor.

For every model and dtype: `selfreg_jax.evaluation.inference.make_predict_fn` over all
devices, on a host (NumPy) batch of synthetic slices at the model's input
size, as evaluation feeds it. The first call (compile + run) is reported
apart; slices/s comes from the median of the later calls.
"""

import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from benchmarks import model_setup
from benchmarks import settings as settings_lib
from benchmarks import timing
from selfreg_jax.core import sharding
from selfreg_jax.evaluation import inference

SUITE = 'inference'
BATCH_SIZE = 8


def measure_predict(name: str, dtype: str,
                    settings: settings_lib.Settings) -> dict[str, Any]:
  setup = model_setup.model_setup(name, dtype, settings.smoke)
  mesh = sharding.data_mesh()
  predict = inference.make_predict_fn(setup.model, mesh)
  variables = jax.device_put(setup.state.variables(),
                             sharding.replicated_sharding(mesh))
  requested = settings_lib.SMOKE_BATCH if settings.smoke else BATCH_SIZE
  batch_size = inference.round_up_batch_size(requested, mesh)
  images = np.asarray(
      model_setup.synthetic_batch(setup.config, batch_size)['image'])
  start = time.perf_counter()
  jax.block_until_ready(predict(variables, images))
  first_call_s = time.perf_counter() - start
  times = timing.run_times(predict, (variables, images), runs=settings.runs,
                           warmup=0)
  predict_s = timing.median(times)
  return {'suite': SUITE, **model_setup.describe(setup.config),
          'batch': batch_size, 'first_call_s': first_call_s,
          'median_s': predict_s, 'runs_s': times,
          'slices_per_s': batch_size / predict_s}


def measurements(settings: settings_lib.Settings,
                 earlier: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  del earlier  # independent of other suites
  for name in settings.models:
    for dtype in settings.dtypes:
      yield measure_predict(name, dtype, settings)


def summary_line(record: dict[str, Any]) -> str:
  return (f"{record['model']:9s} {record['image_size']}px batch "
          f"{record['batch']:<2d} {record['dtype']:8s}: first call (compile + "
          f"run) {record['first_call_s']:6.1f} s, batch "
          f"{record['median_s']:.4f} s, {record['slices_per_s']:7.1f} slices/s")
