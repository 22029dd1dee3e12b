"""Throughput of the training input pipeline on Synapse-sized slices.

Builds a demo (phantom) data set with 512x512 float32 slices, the size of the
Synapse CT slices, and measures the slices per second that
`create_train_loader` delivers at 224x224 with augmentation on, for several
numbers of grain worker processes. Also reports the raw read rate of the
ArrayRecord source (decoding only) for comparison.

  python -m benchmarks.input_pipeline_bench [--smoke] [--out result.json]

--smoke uses 64x64 slices resized to 32 and a few batches: a quick check that
the benchmark runs, not a measurement.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import ml_collections

from data_prep import build
from data_prep import demo
from selfreg_jax import input_pipeline

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
                   num_classes=demo.NUM_CLASSES)))


def measure_loader(config: ml_collections.ConfigDict,
                   num_batches: int) -> dict[str, float]:
  """Seconds to the first batch, then slices/s over `num_batches` batches."""
  start = time.perf_counter()
  loader = input_pipeline.create_train_loader(config, process_index=0,
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
  builder = input_pipeline.open_dataset(config.dataset.name,
                                        config.dataset.data_dir)
  source = builder.as_data_source(config.dataset.train_split)
  start = time.perf_counter()
  for index in range(len(source)):
    source[index]  # pylint: disable=pointless-statement
  return len(source) / (time.perf_counter() - start)


def run(setting: dict, data_dir: pathlib.Path,
        workers: list[int]) -> dict:
  _build(data_dir, setting)
  results = {'setting': setting, 'cpu_count': os.cpu_count(), 'loaders': []}
  results['read_slices_per_s'] = measure_reads(_config(data_dir, setting, 0))
  for num_workers in workers:
    measured = measure_loader(_config(data_dir, setting, num_workers),
                              setting['batches'])
    results['loaders'].append({'num_workers': num_workers, **measured})
  return results


def print_table(results: dict) -> None:
  s = results['setting']
  print(f"\nTraining pipeline, {s['slice_size']}x{s['slice_size']} float32 "
        f"-> {s['image_size']}x{s['image_size']}, augment on, batch "
        f"{s['batch_size']}, {s['batches']} timed batches, "
        f"{results['cpu_count']} CPUs")
  print(f"{'workers':>8} {'startup s':>10} {'slices/s':>10} {'ms/slice':>10}")
  for row in results['loaders']:
    print(f"{row['num_workers']:>8} {row['startup_s']:>10.2f} "
          f"{row['slices_per_s']:>10.1f} {1000 / row['slices_per_s']:>10.2f}")
  print(f"read + decode only: {results['read_slices_per_s']:.0f} slices/s")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes, a few batches (checks it runs)')
  parser.add_argument('--out', type=pathlib.Path,
                      help='write the results as JSON here')
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2],
                      help='numbers of grain worker processes to time')
  parser.add_argument('--data-dir', type=pathlib.Path,
                      help='TFDS data dir to build into and reuse '
                      '(default: a temporary one)')
  args = parser.parse_args(argv)
  setting = SMOKE if args.smoke else FULL
  with tempfile.TemporaryDirectory(prefix='input_pipeline_bench_') as tmp:
    results = run(setting, args.data_dir or pathlib.Path(tmp), args.workers)
  print_table(results)
  if args.out:
    partial = args.out.with_name(args.out.name + '.partial')
    partial.write_text(json.dumps(results, indent=2))
    partial.replace(args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
