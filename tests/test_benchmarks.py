"""`python -m benchmarks.run` end to end in its smoke mode: the JSON it writes,
what it prints, and --only."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy
import pytest

from benchmarks import run as bench_run
from benchmarks import settings
from benchmarks import timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny UNet only: the tiny Swin-UNet's compiles would add over a minute.
MODEL = 'unet'
TIMES = {
    'train_step': ('compile_s', 'median_s', 'images_per_s', 'back_to_back_s',
                   'back_to_back_images_per_s'),
    'inference': ('first_call_s', 'median_s', 'slices_per_s'),
    'selfreg_loss': ('compile_s', 'median_s', 'train_step_s',
                     'share_of_train_step_pct'),
    'metrics': ('optimised_seconds', 'baseline_seconds', 'speedup'),
    'input_pipeline': ('slices_per_s',),
    'memory': (),
    'collectives': ('compile_s',),
}


def _reject_constant(name):
  raise ValueError(f'{name} is not valid JSON')


def run_smoke(tmp_path, *args) -> tuple[str, dict]:
  """Runs the smoke benchmarks into tmp_path; (stdout, parsed JSON)."""
  out = tmp_path / 'results.json'
  completed = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--smoke', '--models', MODEL,
       '--out', str(out), *args],
      cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind
  return completed.stdout, json.loads(out.read_text(),
                                      parse_constant=_reject_constant)


def assert_positive_finite(record, fields):
  for field in fields:
    assert math.isfinite(record[field]) and record[field] > 0, (field, record)


def test_smoke_run_writes_every_suite(tmp_path):
  stdout, results = run_smoke(tmp_path)
  device = results['device']
  assert device == {'platform': jax.devices()[0].platform,
                    'device_kind': jax.devices()[0].device_kind,
                    'count': jax.device_count()}
  assert stdout.startswith(f"device: {device['platform']} "
                           f"({device['device_kind']}) x{device['count']}")
  assert results['jax_version'] == jax.__version__
  assert results['host_cpu_count'] == os.cpu_count()
  assert results['suites'] == list(bench_run.SUITES)
  assert results['settings']['smoke'] is True
  assert results['wall_s'] > 0
  records = results['records']
  assert list(dict.fromkeys(r['suite'] for r in records)) == list(
      bench_run.SUITES)
  by_suite = {name: [r for r in records if r['suite'] == name]
              for name in bench_run.SUITES}
  for name, fields in TIMES.items():
    assert by_suite[name], name
    assert f'[{name}]' in stdout
    for record in by_suite[name]:
      assert_positive_finite(record, fields)
  assert sum('host per step system' in line
             for line in stdout.splitlines()) == len(by_suite['train_step'])
  # One readable line per measurement.
  assert sum(line.startswith('  ') for line in stdout.splitlines()) == len(
      records)

  baseline, selfreg = by_suite['train_step']
  for record in (baseline, selfreg):
    assert (record['model'], record['batch'], record['dtype']) == (
        MODEL, settings.SMOKE_BATCH, 'float32')
    assert len(record['runs_s']) == settings.SMOKE_TIMED_RUNS
    assert record['xla_memory']['total_bytes'] > 0
    # The host's share of a step: system time, and steal where /proc/stat is.
    assert record['system_s'] >= 0
    assert (record['steal_s'] is None) == (not os.path.exists('/proc/stat'))
    assert record['steal_s'] is None or record['steal_s'] >= 0
    assert record['device_peak_bytes'] is None or record[
        'device_peak_bytes'] > 0
  assert (baseline['selfreg'], selfreg['selfreg']) == (False, True)
  # FLOPs of the lowered program: the SelfReg terms add work to the step.
  assert 0 < baseline['gflop'] < selfreg['gflop']
  for record in (baseline, selfreg):
    assert record['gflop_per_s'] == pytest.approx(
        record['gflop'] / record['median_s'])
    assert record['back_to_back_images_per_s'] == pytest.approx(
        record['batch'] / record['back_to_back_s'])
  assert selfreg['selfreg_overhead_pct'] == pytest.approx(
      100 * (selfreg['median_s'] / baseline['median_s'] - 1))

  [loss] = by_suite['selfreg_loss']
  assert loss['train_step_source'] == 'train_step suite'
  assert loss['train_step_s'] == selfreg['median_s']

  [metrics] = by_suite['metrics']
  assert metrics['bit_identical'] is True

  workers = [r.get('num_workers') for r in by_suite['input_pipeline']]
  assert workers == [None, 0, 2]  # read only, then the smoke's worker counts

  # Two batch sizes of the smoke model (far below the host's memory), then
  # the straight line through their plans.
  small, large, line = by_suite['memory']
  assert (small['batch'], large['batch']) == (settings.SMOKE_BATCH,
                                              2 * settings.SMOKE_BATCH)
  totals = [r['xla_memory']['total_bytes'] for r in (small, large)]
  assert 0 < totals[0] < totals[1] <= line['memory_limit_bytes']
  assert line['largest_fitting_batch'] == large['batch']
  assert line['marginal_bytes_per_image'] == pytest.approx(
      (totals[1] - totals[0]) / settings.SMOKE_BATCH)
  assert line['fixed_bytes'] == pytest.approx(
      totals[0] - settings.SMOKE_BATCH * line['marginal_bytes_per_image'])

  # The UNet step all-reduces its gradients and BatchNorm statistics only.
  # One layout (the 2-process one is tested in test_collectives).
  assert [(r['processes'], r['devices']) for r in by_suite['collectives']] == [
      (1, 4)]
  for record in by_suite['collectives']:
    assert record['gradient_bytes'] == record['param_bytes'] > 0
    assert record['other_all_reduce_bytes'] >= record['batch_stats_bytes']
    assert {kind for kind, counts in record['kinds'].items()
            if counts['instructions']} == {'all-reduce'}


def test_only_restricts_suites(tmp_path):
  # The cheapest suite: a model suite would add its compiles (~30 s), the
  # input pipeline its worker start-ups.
  only = ('metrics',)
  stdout, results = run_smoke(tmp_path, '--only', ','.join(only))
  assert results['suites'] == list(only)
  assert list(dict.fromkeys(r['suite'] for r in results['records'])) == list(
      only)
  assert '[train_step]' not in stdout and '[selfreg_loss]' not in stdout


@pytest.mark.parametrize('flag, value', [
    ('--only', 'train_step,nope'),
    ('--models', 'resnet'),
    ('--dtypes', 'float16'),
    ('--batches', '4,0'),
    ('--steps', '0'),
])
def test_bad_option_is_refused(flag, value, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench_run.parse_args([flag, value])
  assert exit_info.value.code == 2
  assert flag in capsys.readouterr().err


def test_back_to_back_calls_chain_their_arguments_and_wait_for_the_last():
  calls, warmup = 3, 2
  step = jax.jit(lambda count: count + 1)
  seconds, args = timing.back_to_back_seconds(
      step, (jax.numpy.zeros((), 'int32'),), calls=calls, warmup=warmup,
      next_args=lambda output, args: (output,))
  assert seconds > 0
  assert int(args[0]) == warmup + calls
  with pytest.raises(ValueError, match='calls must be >= 1'):
    timing.back_to_back_seconds(step, args, calls=0,
                                next_args=lambda output, args: (output,))


def test_host_clock_counts_the_kernel_work_of_fresh_memory():
  # Writing 256 MiB of freshly mapped memory makes the kernel fault in and
  # zero it: the process's system time grows, as it does on every XLA:CPU
  # step with a fresh temporary buffer.
  start = timing.host_clock()
  numpy.ones(2 ** 26, numpy.float32)
  elapsed = timing.host_seconds(start, timing.host_clock())
  assert elapsed.system_s > 0
  if os.path.exists('/proc/stat'):
    assert elapsed.steal_s >= 0
  else:
    assert elapsed.steal_s is None
