"""Sweeps and reports: the MoNuSeg study's grid run tiny end to end, and the
report's arm statistics against hand-computed values."""

import csv
import json
import math
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

import tiny_train_config
from configs.studies import monuseg_cpu
from selfreg_jax.common import cli
from selfreg_jax.common import files
from selfreg_jax.core import checkpoints
from selfreg_jax.core import configuration
from selfreg_jax.evaluation import evaluate
from selfreg_jax.tools import report
from selfreg_jax.tools import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / 'tests' / 'tiny_train_config.py'
SEEDS = (0, 1)
TRAIN_STEPS = 2


def _tiny_study_config(data_dir):
  """The MoNuSeg study's definition (its grid: seeds x SelfReg on/off), with
  the tiny training run's data, model and sizes and 2 seeds."""
  tiny = tiny_train_config.get_config('unet')
  config = monuseg_cpu.get_config()
  for field in ('dataset', 'model', 'batch_size', 'eval'):
    config[field] = tiny[field]
  config.dataset.data_dir = str(data_dir)
  config.num_train_steps = TRAIN_STEPS
  config.eval_every_steps = config.checkpoint_every_steps = TRAIN_STEPS
  config.image_summary_every_steps = 0
  config.eval.split = 'validation'
  config.sweep.seed = list(SEEDS)
  return config


@pytest.fixture(scope='module')
def sweep_root(tiny_demo_data_dir, tmp_path_factory):
  """The tiny study (2 seeds x 2 arms), run once; returns (root, status)."""
  root = tmp_path_factory.mktemp('sweep')
  config = _tiny_study_config(tiny_demo_data_dir)
  status = sweep.run_sweep(config, root, sweep.config_grid(config))
  return root, status


def _point_names():
  return [f'seed={seed},loss.use_selfreg={arm}' for seed in SEEDS
          for arm in (False, True)]


def _summaries(root):
  return sorted(root.glob(f'*/{evaluate.EVAL_DIR}/*/{evaluate.SUMMARY_FILE}'))


def test_sweep_trains_one_run_per_point_with_its_value(sweep_root):
  root, status = sweep_root
  names = _point_names()
  assert status == {name: 'trained' for name in names}
  assert sorted(p.parents[2].name for p in _summaries(root)) == sorted(names)
  configs = {r.name: r.config for r in map(report.load_run, sorted(
      root / n for n in names))}
  for name in names:
    seed, use_selfreg = (v.split('=')[1] for v in name.split(','))
    assert configs[name]['seed'] == int(seed)
    assert configs[name]['loss.use_selfreg'] == (use_selfreg == 'True')
  assert not any(k.startswith('sweep') for c in configs.values() for k in c)
  record = json.loads((root / sweep.SWEEP_RECORD).read_text())
  assert set(record) == set(names)
  assert all(r['status'] == 'done' and r['seconds'] > 0
             for r in record.values())


def test_rerun_skips_evaluated_points(sweep_root, tiny_demo_data_dir):
  root, _ = sweep_root
  config = _tiny_study_config(tiny_demo_data_dir)
  before = {p: p.stat().st_mtime_ns for p in root.glob('*/**/*')
            if p.is_file()}
  status = sweep.run_sweep(config, root, sweep.config_grid(config))
  assert set(status.values()) == {'skipped'}
  after = {p: p.stat().st_mtime_ns for p in root.glob('*/**/*')
           if p.is_file()}
  assert after == before


def test_sweep_ends_with_the_study_report_of_two_arms(sweep_root):
  """The whole path: the sweep's own report groups the seeds into the two
  arms, with the paired difference."""
  root, _ = sweep_root
  with open(root / report.REPORT_CSV) as f:
    rows = list(csv.DictReader(f))
  assert sorted(r['run'] for r in rows) == sorted(_point_names())
  # Only the swept keys differ between the runs.
  assert {'seed', 'loss.use_selfreg'} <= set(rows[0])
  assert not {'loss.scr_weight', 'dataset.data_dir'} & set(rows[0])
  for row in rows:
    assert int(row['step']) <= TRAIN_STEPS
    assert 0 <= float(row['mean_dice']) <= 1
  runs = [report.load_run(root / r['run']) for r in rows]
  arms = report.group_arms(runs)
  assert [a.setting for a in arms] == [{'loss.use_selfreg': False},
                                       {'loss.use_selfreg': True}]
  assert [a.seeds for a in arms] == [list(SEEDS)] * 2
  dice = {r['run']: float(r['mean_dice']) for r in rows}
  expected = np.mean([dice[f'seed={s},loss.use_selfreg=True']
                      - dice[f'seed={s},loss.use_selfreg=False']
                      for s in SEEDS])
  difference = report.paired_difference(*arms, 'mean_dice')
  assert difference.n == len(SEEDS)
  assert difference.mean == pytest.approx(expected)
  markdown = (root / report.REPORT_MD).read_text()
  assert 'Paired by seed: **loss.use_selfreg=True** minus' in markdown
  runs_table = markdown.split('## Runs')[1].strip().splitlines()
  assert len(runs_table) == 2 + 2 + len(rows)   # title, blank, header, rule
  plot = np.asarray(Image.open(root / report.REPORT_PLOT))
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
  # The seed varies slowest, whatever its place in the grid.
  assert points == [{'seed': 1, 'loss.scr_weight': 0},
                    {'seed': 1, 'loss.scr_weight': 0.01},
                    {'seed': 2, 'loss.scr_weight': 0},
                    {'seed': 2, 'loss.scr_weight': 0.01}]
  run = subprocess.run(
      [sys.executable, '-m', 'selfreg_jax.tools.sweep',
       f'--config={CONFIG_FILE}:unet', '--workdir=/sweeps/a',
       '--grid=loss.scr_weight=0,0.01', '--grid=seed=1,2',
       '--config.num_train_steps=5', '--print-commands'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  lines = run.stdout.strip().splitlines()
  assert len(lines) == len(points)
  assert lines[-1] == (
      f'python main.py --config={CONFIG_FILE}:unet '
      '--workdir=/sweeps/a/seed=2,loss.scr_weight=0.01 '
      '--config.num_train_steps=5 --config.seed=2 '
      '--config.loss.scr_weight=0.01')


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


# Fabricated evaluations of a 2-arm x 3-seed study: (use_selfreg, seed) ->
# (mean Dice, mean HD95, mean ASSD). ASSD of one baseline seed is NaN.
FABRICATED = {
    (False, 0): (0.70, 10.0, 2.0), (False, 1): (0.72, 12.0, math.nan),
    (False, 2): (0.74, 14.0, 4.0),
    (True, 0): (0.71, 9.0, 1.0), (True, 1): (0.74, 9.0, 1.5),
    (True, 2): (0.77, 12.0, 2.0),
}


def _fabricate_run(workdir, use_selfreg, seed):
  dice, hd95, assd = FABRICATED[use_selfreg, seed]
  config = tiny_train_config.get_config('unet')
  config.seed, config.loss.use_selfreg = seed, use_selfreg
  checkpoints.write_variables(workdir, {'params': {'w': np.zeros(2)}}, config,
                              step=5)
  summary = dict(split='test', step=5, mean_dice=dice, mean_jaccard=dice - 0.1,
                 mean_hd95=hd95, mean_assd=assd, class_names=['foreground'],
                 per_class={'dice': {'foreground': dice},
                            'jaccard': {'foreground': dice - 0.1},
                            'hd95': {'foreground': hd95},
                            'assd': {'foreground': assd}})
  files.write_atomic(
      workdir / evaluate.EVAL_DIR / 'test_step5' / evaluate.SUMMARY_FILE,
      json.dumps(summary).encode())


@pytest.fixture(scope='module')
def fabricated_study(tmp_path_factory):
  root = tmp_path_factory.mktemp('study')
  for use_selfreg, seed in FABRICATED:
    _fabricate_run(root / f'loss.use_selfreg={use_selfreg},seed={seed}',
                   use_selfreg, seed)
  return root


def test_report_groups_seeds_into_arms_with_hand_computed_statistics(
    fabricated_study, tmp_path):
  runs = report.write_report([fabricated_study], tmp_path)
  arms = report.group_arms(runs)
  assert [a.setting for a in arms] == [{'loss.use_selfreg': False},
                                       {'loss.use_selfreg': True}]
  assert [a.seeds for a in arms] == [[0, 1, 2], [0, 1, 2]]
  baseline = report.arm_statistics(arms[0], ['mean_dice', 'mean_assd'])
  # Dice 0.70, 0.72, 0.74: mean 0.72, sample std 0.02; ASSD 2, 4 (NaN left
  # out): n 2, mean 3, std sqrt(2).
  assert baseline['mean_dice'].n == 3
  assert baseline['mean_dice'].mean == pytest.approx(0.72)
  assert baseline['mean_dice'].std == pytest.approx(0.02)
  assert baseline['mean_assd'].n == 2
  assert baseline['mean_assd'].mean == pytest.approx(3.0)
  assert baseline['mean_assd'].std == pytest.approx(math.sqrt(2))
  # Paired differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t = 2 sqrt(3)
  # on 2 degrees of freedom; t(0.975, 2) = 4.302653 gives the interval
  # 0.02 +- 0.024841; the t cdf on 2 dof, 1/2 + t / (2 sqrt(2 + t^2)), gives
  # p = 1 - 2 sqrt(3) / sqrt(14).
  diff = report.paired_difference(arms[0], arms[1], 'mean_dice')
  assert diff.n == 3
  assert diff.mean == pytest.approx(0.02)
  assert diff.std == pytest.approx(0.01)
  assert diff.low == pytest.approx(0.02 - 0.0248414, abs=1e-6)
  assert diff.high == pytest.approx(0.02 + 0.0248414, abs=1e-6)
  assert diff.p_value == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))
  # HD95 differences -1, -3, -2: mean -2, sd 1.
  hd95 = report.paired_difference(arms[0], arms[1], 'mean_hd95')
  assert (hd95.mean, hd95.std) == (pytest.approx(-2.0), pytest.approx(1.0))
  # ASSD pairs only where both seeds are finite (seeds 0 and 2).
  assert report.paired_difference(arms[0], arms[1], 'mean_assd').n == 2

  markdown = (tmp_path / report.REPORT_MD).read_text()
  assert '| loss.use_selfreg=False | 0, 1, 2 | 72.00 ± 2.00 (n=3)' in markdown
  assert '| loss.use_selfreg=True | 0, 1, 2 | 74.00 ± 3.00 (n=3)' in markdown
  assert '| mean Dice (%) | 3 | +2.00 | [-0.48, +4.48] | 0.0742 |' in markdown
  with open(tmp_path / report.ARMS_CSV) as f:
    rows = {(r['arm'], r['metric']): r for r in csv.DictReader(f)}
  row = rows['loss.use_selfreg=True', 'dice/foreground']
  assert (int(row['n']), float(row['mean']), float(row['std'])) == (
      3, pytest.approx(0.74), pytest.approx(0.03))


def test_report_plots_a_boolean_setting_as_bars_from_zero(fabricated_study,
                                                          tmp_path):
  runs = report.write_report([fabricated_study], tmp_path)
  assert report.plot_key(runs, None) is None   # booleans are not an x axis
  plot = np.asarray(Image.open(tmp_path / report.REPORT_PLOT))
  assert plot.ndim == 3 and plot.std() > 0


def test_report_refuses_the_same_run_twice(fabricated_study):
  run = fabricated_study / 'loss.use_selfreg=True,seed=0'
  with pytest.raises(ValueError, match='same config'):
    report.write_report([run, run])


def test_report_cli_prints_no_library_info_lines(fabricated_study, tmp_path):
  """Reading each run's saved config goes through orbax, whose INFO lines
  (tagged '[process=N]') the entry point hides."""
  run = subprocess.run(
      [sys.executable, '-m', 'selfreg_jax.tools.report', str(fabricated_study),
       f'--out={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert (tmp_path / report.REPORT_MD).is_file()
  for line in (run.stdout + run.stderr).splitlines():
    assert 'orbax' not in line and '[process=' not in line, line
