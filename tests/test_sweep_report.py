"""Sweeps of the tiny demo config and the report over their runs."""

import csv
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

import tiny_train_config
from selfreg_jax import cli
from selfreg_jax import configuration
from selfreg_jax import evaluate
from selfreg_jax import report
from selfreg_jax import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / 'tests' / 'tiny_train_config.py'
# The seed is swept (not a loss weight) so that both points run the same
# compiled programs: the second point reuses the first's XLA cache entries.
SWEPT_KEY = 'seed'
SWEPT_VALUES = (0, 1)
TRAIN_STEPS = 2


def _sweep_config(data_dir):
  config = tiny_train_config.get_config('unet')
  config.dataset.data_dir = str(data_dir)
  config.num_train_steps = TRAIN_STEPS
  config.checkpoint_every_steps = TRAIN_STEPS
  config.image_summary_every_steps = 0
  config.eval.split = 'validation'
  config.loss.use_selfreg = False
  config.sweep = {SWEPT_KEY: list(SWEPT_VALUES)}
  return config


@pytest.fixture(scope='module')
def sweep_root(tiny_demo_data_dir, tmp_path_factory):
  """A two-point sweep, run once; returns (root, first status)."""
  root = tmp_path_factory.mktemp('sweep')
  config = _sweep_config(tiny_demo_data_dir)
  status = sweep.run_sweep(config, root, sweep.config_grid(config))
  return root, status


def _summaries(root):
  return sorted(root.glob(f'*/{evaluate.EVAL_DIR}/*/{evaluate.SUMMARY_FILE}'))


def test_sweep_trains_one_run_per_point_with_its_value(sweep_root):
  root, status = sweep_root
  names = [f'{SWEPT_KEY}={v}' for v in SWEPT_VALUES]
  assert status == {name: 'trained' for name in names}
  assert [p.parents[2].name for p in _summaries(root)] == names
  configs = {r.name: r.config for r in map(report.load_run, sorted(
      root / n for n in names))}
  assert [configs[n][SWEPT_KEY] for n in names] == list(SWEPT_VALUES)
  assert not any(k.startswith('sweep') for c in configs.values() for k in c)


def test_rerun_skips_evaluated_points(sweep_root, tiny_demo_data_dir):
  root, _ = sweep_root
  before = {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
  config = _sweep_config(tiny_demo_data_dir)
  status = sweep.run_sweep(config, root, sweep.config_grid(config))
  assert set(status.values()) == {'skipped'}
  after = {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
  assert after == before


def test_report_has_one_row_per_run_and_a_plot(sweep_root, tmp_path):
  root, _ = sweep_root
  runs = report.write_report([root], tmp_path)
  with open(tmp_path / report.REPORT_CSV) as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == [r.name for r in runs]
  assert len(rows) == len(SWEPT_VALUES)
  # The swept key is the only config difference between the two runs.
  assert [int(r[SWEPT_KEY]) for r in rows] == list(SWEPT_VALUES)
  assert not {'loss.scr_weight', 'dataset.data_dir'} & set(rows[0])
  for row, run in zip(rows, runs):
    assert float(row['mean_dice']) == pytest.approx(run.summary['mean_dice'])
    assert int(row['step']) == TRAIN_STEPS
    for name in run.summary['class_names']:
      assert f'dice/{name}' in row and f'hd95/{name}' in row
  markdown = (tmp_path / report.REPORT_MD).read_text().splitlines()
  assert len(markdown) == 2 + len(SWEPT_VALUES)
  plot = np.asarray(Image.open(tmp_path / report.REPORT_PLOT))
  assert plot.ndim == 3 and plot.std() > 0


def test_nested_and_dotted_sweep_keys_and_grid_flags_give_the_same_grid():
  key, values = 'loss.scr_weight', [0.0, 0.01]
  nested = tiny_train_config.get_config('unet')
  nested.sweep = {'loss': {'scr_weight': values}}
  config = tiny_train_config.get_config('unet')
  config.sweep = ml_collections.ConfigDict({key: values},
                                           allow_dotted_keys=True)
  flags = [f"{key}={','.join(map(str, values))}"]
  assert (sweep.config_grid(nested) == sweep.config_grid(config) ==
          sweep.config_grid(tiny_train_config.get_config('unet'), flags) ==
          {key: values})
  assert sweep.point_config(config, {key: 0.01}).loss.scr_weight == 0.01
  with pytest.raises(ValueError, match='Both config.sweep and --grid'):
    sweep.config_grid(config, flags)


def test_grid_flags_and_printed_commands():
  grid = sweep.parse_grid_flags(['loss.scr_weight=0,0.01', 'seed=1,2'])
  assert grid == {'loss.scr_weight': [0, 0.01], 'seed': [1, 2]}
  points = sweep.grid_points(grid)
  assert len(points) == 4
  run = subprocess.run(
      [sys.executable, '-m', 'selfreg_jax.sweep',
       f'--config={CONFIG_FILE}:unet', '--workdir=/sweeps/a',
       '--grid=loss.scr_weight=0,0.01', '--grid=seed=1,2',
       '--config.num_train_steps=5', '--print-commands'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  lines = run.stdout.strip().splitlines()
  assert len(lines) == len(points)
  assert lines[-1] == (
      f'python main.py --config={CONFIG_FILE}:unet '
      '--workdir=/sweeps/a/loss.scr_weight=0.01,seed=2 '
      '--config.num_train_steps=5 --config.loss.scr_weight=0.01 '
      '--config.seed=2')


@pytest.mark.parametrize('specs,message', [
    (['loss.scr_weight'], 'expected KEY=V1,V2'),
    (['seed=1', 'seed=2'], 'given twice'),
])
def test_bad_grid_flags_are_refused(specs, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid_flags(specs)


def test_unknown_sweep_key_is_named_with_the_closest_key():
  config = tiny_train_config.get_config('unet')
  config.sweep = {'loss': {'scr_weigth': [0.0, 0.1]}}
  grid = sweep.config_grid(config)
  with pytest.raises(cli.UserError) as error:
    sweep.point_config(config, sweep.grid_points(grid)[0])
  assert str(error.value) == ("unknown config key 'loss.scr_weigth' (did you "
                              "mean 'loss.scr_weight'?)")


def test_every_point_is_validated_before_any_trains(tmp_path):
  config = tiny_train_config.get_config('unet')
  with pytest.raises(configuration.ConfigError) as error:
    sweep.run_sweep(config, tmp_path, {'optimizer.momentum': [0.9, -1.0]})
  assert str(error.value) == ('sweep point optimizer.momentum=-1.0: '
                              'config.optimizer.momentum=-1.0 must be in '
                              '[0, 1).')
  assert not list(tmp_path.iterdir())


def test_report_of_a_folder_without_runs_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    report.write_report([tmp_path])
