"""Runs the benchmark suites and writes every measurement to one JSON file.

  python -m benchmarks.run [--only NAME[,NAME]] [--out results.json]
      [--smoke] [--steps N] [--models unet,swin_unet] [--batches 4,8]
      [--dtypes float32,bfloat16]

Suites (all by default, in this order):
  train_step      full-size UNet / Swin-UNet train step at 224, with and
                  without SelfReg: compile s, step s, images/s, memory
  inference       slices/s of the evaluation predictor
  selfreg_loss    the SelfReg terms alone (value + gradient), and their share
                  of the train step
  metrics         Dice/Jaccard/HD95/ASSD of a 100x512x512 8-organ case
                  against the whole-volume EDT baseline
  input_pipeline  training-loader slices/s with 0, 1 and 2 grain workers
  memory          compile-only: XLA's memory plan of the SelfReg train step
                  at batch 4, 8, 16, ... until it exceeds the device's
                  memory; the largest batch that fits
  collectives     compile-only: the collectives of the full-size train step
                  on 1 process x 64 CPU devices and 2 processes x 4, with
                  the parameter bytes and compile s

Compilation is timed apart; a time is the median of --steps runs after a
warm-up run. The JSON holds the device, the JAX version, the host's CPU
count and one record per measurement; it is rewritten (atomically) after
every measurement, so an interrupted run keeps what it measured.

--smoke shrinks everything (tiny models at 32 px, batch 2, tiny volume and
data set, float32 only) and compiles with most XLA optimisations off
(`jax_disable_most_optimizations`): it checks that every suite runs, it
measures nothing.
"""

import argparse
import dataclasses
import datetime
import importlib
import os
import pathlib
import time
from typing import Any, Sequence

import jax

from benchmarks import settings as settings_lib
from benchmarks import timing
from selfreg_jax.common import runtime

# Suite name -> module with measurements(settings, earlier_records) and
# summary_line(record).
SUITES = {
    'train_step': 'benchmarks.train_step_bench',
    'inference': 'benchmarks.inference_bench',
    'selfreg_loss': 'benchmarks.selfreg_loss_bench',
    'metrics': 'benchmarks.metrics_bench',
    'input_pipeline': 'benchmarks.input_pipeline_bench',
    'memory': 'benchmarks.memory_bench',
    'collectives': 'benchmarks.collectives_bench',
}
DEFAULT_OUT = pathlib.Path('runs') / 'benchmarks.json'


def _names(text: str, known: Sequence[str]) -> tuple[str, ...]:
  names = tuple(name.strip() for name in text.split(',') if name.strip())
  unknown = [name for name in names if name not in known]
  if not names or unknown:
    raise argparse.ArgumentTypeError(
        f'expected a comma-separated list of {", ".join(known)}; got '
        f'{text!r}')
  return names


def _batches(text: str) -> tuple[int, ...]:
  try:
    batches = tuple(int(part) for part in text.split(','))
  except ValueError:
    batches = ()
  if not batches or min(batches) < 1:
    raise argparse.ArgumentTypeError(
        f'expected comma-separated positive integers; got {text!r}')
  return batches


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument(
      '--only', type=lambda text: _names(text, list(SUITES)),
      default=tuple(SUITES), help='comma-separated suites to run')
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT,
                      help=f'JSON results file (default {DEFAULT_OUT})')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes: checks that the suites run')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed runs per measurement (default '
                      f'{settings_lib.TIMED_RUNS}, smoke '
                      f'{settings_lib.SMOKE_TIMED_RUNS})')
  parser.add_argument(
      '--models', default=settings_lib.MODELS,
      type=lambda text: _names(text, settings_lib.MODELS),
      help='comma-separated models of the model suites')
  parser.add_argument('--batches', type=_batches, default=None,
                      help='comma-separated train-step batch sizes (default '
                      f'{",".join(map(str, settings_lib.TRAIN_BATCHES))}, '
                      f'smoke {settings_lib.SMOKE_BATCH})')
  parser.add_argument(
      '--dtypes', default=None,
      type=lambda text: _names(text, settings_lib.DTYPES),
      help='comma-separated computation dtypes of the model suites (default '
      f'{",".join(settings_lib.DTYPES)}, smoke float32)')
  args = parser.parse_args(argv)
  if args.steps is not None and args.steps < 1:
    parser.error(f'--steps must be >= 1, got {args.steps}')
  return args


def settings_from_args(args: argparse.Namespace) -> settings_lib.Settings:
  smoke = args.smoke
  return settings_lib.Settings(
      smoke=smoke,
      runs=args.steps or (settings_lib.SMOKE_TIMED_RUNS if smoke
                          else settings_lib.TIMED_RUNS),
      models=args.models,
      batches=args.batches or ((settings_lib.SMOKE_BATCH,) if smoke
                               else settings_lib.TRAIN_BATCHES),
      dtypes=args.dtypes or (settings_lib.SMOKE_DTYPES if smoke
                             else settings_lib.DTYPES))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.smoke:  # faster compiles, slower programs: smoke times nothing
    jax.config.update('jax_disable_most_optimizations', True)
  settings = settings_from_args(args)
  start = time.perf_counter()
  device = timing.device_summary()
  results = {
      'device': device, 'jax_version': jax.__version__,
      'host_cpu_count': os.cpu_count(),
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES'),
      'xla_flags': os.environ.get('XLA_FLAGS'),
      'started_at': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'suites': list(args.only), 'settings': dataclasses.asdict(settings),
      'records': []}
  print(f'device: {timing.describe_device(device)}, jax {jax.__version__}, '
        f'{os.cpu_count()} host CPUs{" (smoke run)" if settings.smoke else ""}',
        flush=True)
  for name in args.only:
    suite = importlib.import_module(SUITES[name])
    print(f'[{name}]', flush=True)
    for record in suite.measurements(settings, results['records']):
      results['records'].append(record)
      _save(results, args.out, start)
      print(f'  {suite.summary_line(record)}', flush=True)
  _save(results, args.out, start)
  print(f"done in {results['wall_s']:.1f} s; results in {args.out}")
  return results


def _save(results: dict[str, Any], path: pathlib.Path, start: float) -> None:
  results['wall_s'] = time.perf_counter() - start
  timing.write_json(path, results)


if __name__ == '__main__':
  # Time what `main.py` runs: smaller XLA:CPU buffers, reused between steps.
  runtime.prepare_process()
  main()
