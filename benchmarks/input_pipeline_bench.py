"""Suite `input_pipeline`: throughput of the training input pipeline.

Builds a demo (phantom) data set with 512x512 float32 slices, the size of the
Synapse CT slices, in a temporary folder and measures the slices per second
that `create_train_loader` delivers at 224x224 with augmentation on, for
0, 1 and 2 grain worker processes, after the first batch (whose wait is
reported as the start-up time). Also reports the raw read rate of the
ArrayRecord source (decoding only) for comparison. With --smoke: 64x64
slices resized to 32, a few batches, 0 and 2 workers (each worker count
costs its processes' start-up).
"""

import pathlib
import tempfile
import time
from typing import Any, Iterator, Sequence

import ml_collections

from benchmarks import settings as settings_lib
from data_prep import build
from data_prep import demo
from selfreg_jax.core import input_pipeline

SUITE = 'input_pipeline'
WORKER_COUNTS = (0, 1, 2)
SMOKE_WORKER_COUNTS = (0, 2)

# (slice size in, image size out, train cases, slices per case, batch size,
#  timed batches) of the full and the smoke run.
FULL = dict(slice_size=512, image_size=224, cases=2, slices=16,
            batch_size=8, batches=12)
SMOKE = dict(slice_size=64, image_size=32, cases=1, slices=4,
             batch_size=2, batches=2)


def _build(data_dir: pathlib.Path, setting: dict) -> None:
  build.build_dataset(
      'demo', data_dir=data_dir, num_train_cases=setting['cases'],
      num_validation_cases=1, num_test_cases=1, min_slices=setting['slices'],
      max_slices=setting['slices'], min_size=setting['slice_size'],
      max_size=setting['slice_size'], seed=0)


def _config(data_dir: pathlib.Path, setting: dict,
            num_workers: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=setting['batch_size'],
      dataset=dict(name='selfreg_demo', data_dir=str(data_dir),
                   image_size=setting['image_size'], train_split='train',
                   num_workers=num_workers, augment=True,
                   in_channels=demo.IN_CHANNELS,
                   num_classes=demo.NUM_CLASSES, volumetric=True)))


def measure_loader(config: ml_collections.ConfigDict,
                   num_batches: int) -> dict[str, float]:
  """Seconds to the first batch, then slices/s over `num_batches` batches."""
  start = time.perf_counter()
  loader = input_pipeline.create_train_loader(
      config, input_pipeline.DataSet.open(config.dataset), process_index=0,
      process_count=1)
  try:
    next(loader)
    first = time.perf_counter()
    for _ in range(num_batches):
      next(loader)
    elapsed = time.perf_counter() - first
  finally:
    loader.close()
  return {'startup_s': first - start,
          'slices_per_s': num_batches * config.batch_size / elapsed}


def measure_reads(config: ml_collections.ConfigDict) -> float:
  """Slices/s of reading and decoding the training split, no transforms."""
  source = input_pipeline.DataSet.open(config.dataset).source(
      config.dataset.train_split)
  start = time.perf_counter()
  for index in range(len(source)):
    source[index]  # pylint: disable=pointless-statement
  return len(source) / (time.perf_counter() - start)


def measurements(settings: settings_lib.Settings,
                 earlier: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  """The read rate, then one record per number of grain workers."""
  del earlier  # independent of other suites
  setting = SMOKE if settings.smoke else FULL
  with tempfile.TemporaryDirectory(prefix='input_pipeline_bench_') as tmp:
    data_dir = pathlib.Path(tmp)
    _build(data_dir, setting)
    yield {'suite': SUITE, 'loader': 'read_only', **setting,
           'slices_per_s': measure_reads(_config(data_dir, setting, 0))}
    for num_workers in (SMOKE_WORKER_COUNTS if settings.smoke
                        else WORKER_COUNTS):
      measured = measure_loader(_config(data_dir, setting, num_workers),
                                setting['batches'])
      yield {'suite': SUITE, 'loader': 'train', **setting,
             'num_workers': num_workers, **measured}


def summary_line(record: dict[str, Any]) -> str:
  size_in, size_out = record['slice_size'], record['image_size']
  if record['loader'] == 'read_only':
    return (f"{size_in}x{size_in} float32 slices, read + decode only: "
            f"{record['slices_per_s']:.0f} slices/s")
  return (f"{size_in}x{size_in} float32 -> {size_out}x{size_out}, augment on, "
          f"batch {record['batch_size']}, {record['num_workers']} workers: "
          f"start-up {record['startup_s']:.2f} s, "
          f"{record['slices_per_s']:.1f} slices/s over {record['batches']} "
          f"batches")
