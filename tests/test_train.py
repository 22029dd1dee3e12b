"""End-to-end training: logs, checkpoints, resume, multi-device, multi-process."""

import csv
import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

from clu import metric_writers
import jax
import nibabel as nib
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
import tensorflow_datasets as tfds

import fixtures_sources
import tiny_configs
import tiny_train_config
from configs import synapse_swin
from data_prep import build
from data_prep.sources import synapse
from selfreg_jax import train
from selfreg_jax.common import cli
from selfreg_jax.common import distributed
from selfreg_jax.core import checkpoints
from selfreg_jax.core import configuration
from selfreg_jax.core import input_pipeline
from selfreg_jax.core import outputs
from selfreg_jax.core.models import create_model
from selfreg_jax.evaluation import evaluate
from test_checkpoints import flip_bytes, weight_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / 'tests' / 'tiny_train_config.py'


def _config(data_dir, model='unet', **overrides):
  config = tiny_train_config.get_config(model)
  config.dataset.data_dir = str(data_dir)
  config.update(overrides)
  return config


def _events(workdir) -> event_accumulator.EventAccumulator:
  accumulator = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return accumulator


def _scalars_by_step(workdir, tag) -> dict[int, float]:
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in _events(workdir).Tensors(tag)}


def _scalar_series(workdir, tag) -> list[float]:
  return list(_scalars_by_step(workdir, tag).values())


def _variables(workdir, config, which='latest'):
  model = create_model(config.model)
  size = config.dataset.image_size
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, size, size, 1), np.float32)))
  return checkpoints.restore_variables(workdir, abstract, which)


def _run_main(args, env=None, launcher=(), **kwargs
              ) -> subprocess.CompletedProcess:
  """Runs main.py with `args`, under the `launcher` command if given."""
  return subprocess.run([*launcher, sys.executable, str(ROOT / 'main.py'),
                         *args],
                        cwd=ROOT, env=env or dict(os.environ),
                        capture_output=True, text=True, **kwargs)


def _main_args(config_arg, workdir, data_dir, *extra):
  return [f'--config={CONFIG_FILE}:{config_arg}', f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}', *extra]


def test_demo_training_lowers_loss_and_writes_logs_and_checkpoints(
    tiny_demo_data_dir, tmp_path, caplog):
  config = _config(tiny_demo_data_dir, num_train_steps=30, log_every_steps=5,
                   image_summary_every_steps=10, eval_every_steps=10)
  # At this rate 30 steps learn the largest organ (test Dice 0.39, the mean
  # over the 4 classes 0.099; measured), enough to beat a trivial baseline.
  config.optimizer.learning_rate = 1e-2
  config.eval.save_predictions = True
  with caplog.at_level(logging.INFO):
    summary = train.train_and_evaluate(config, str(tmp_path), 'train_and_eval')
  # Step 1, then every log_every_steps steps.
  assert list(_scalars_by_step(tmp_path, 'train/total')) == [1, 5, 10, 15, 20,
                                                             25, 30]
  losses = _scalar_series(tmp_path, 'train/total')
  assert losses[-1] < 0.8 * losses[0]
  tags = _events(tmp_path).Tags()['tensors']
  names = input_pipeline.DataSet.open(config.dataset).class_names
  for tag in ('train/ce', 'train/dice', 'train/scr', 'train/ifd',
              'train/learning_rate', 'train/grad_norm',
              'train/steps_per_sec', 'train/input_prediction_truth',
              'val/mean_dice', 'val/mean_hd95', 'test/mean_dice',
              *(f'val/dice/{name}' for name in names),
              *(f'test/dice/{name}' for name in names)):
    assert tag in tags, tag
  for constant in ('volumetric', 'image_size', 'num_slices', 'num_cases'):
    assert f'val/{constant}' not in tags
  assert 'train/bce' not in tags  # a multi-class model's CE
  # The test metrics at the evaluated step, as in summary.json.
  assert _scalars_by_step(tmp_path, 'test/mean_dice') == {
      summary['step']: pytest.approx(summary['mean_dice'])}
  assert _scalars_by_step(tmp_path, f'test/dice/{names[0]}') == {
      summary['step']: pytest.approx(summary['per_class']['dice'][names[0]])}
  images = _events(tmp_path).Tensors('train/input_prediction_truth')
  assert len(images) == 3
  assert (tmp_path / checkpoints.CHECKPOINT_DIR / '30' / 'variables').is_dir()
  _assert_test_dice_recomputes(summary, config,
                               tmp_path / evaluate.EVAL_DIR
                               / f"test_step{summary['step']}")

  log = [r.getMessage() for r in caplog.records]
  slices = tfds.builder(config.dataset.name, data_dir=tiny_demo_data_dir
                        ).info.splits['train'].num_examples
  protocol = next(i for i, m in enumerate(log) if m.startswith('Protocol '))
  assert log[protocol] == (
      f"Protocol 'validated': {slices} training slices in split 'train', "
      f'{math.ceil(slices / 8)} steps per epoch (ceil({slices} / batch 8)), '
      f'30 steps ({30 / math.ceil(slices / 8):.4g} epochs).')
  compiled = next(i for i, m in enumerate(log)
                  if m.startswith('Compiled the train step in '))
  progress = [m for m in log if m.startswith('step ')]
  assert protocol < compiled < log.index(progress[0])
  assert progress[0].startswith('step 1/30  loss ')
  for line in progress:
    assert re.search(r'  [0-9.e+-]+ steps/s.*  eta \d+:\d\d:\d\d$', line), line
  tables = [m for m in log if m.startswith('Evaluation of validation')]
  assert [re.search(r"split 'validation', step (\d+),", m).group(1)
          for m in tables] == ['10', '20', '30']


def _paper_dice(pred: np.ndarray, truth: np.ndarray) -> float:
  """Dice of two bool masks by the paper's rules (docs/design.md section 4):
  0 for an empty prediction, 1 for a prediction where the truth is empty."""
  if not pred.any():
    return 0.0
  if not truth.any():
    return 1.0
  return 2 * (pred & truth).sum() / (pred.sum() + truth.sum())


def _assert_test_dice_recomputes(summary, config, out_dir):
  """The run's test Dice (paper mode), per case and class in its CSV and
  averaged in its summary, equals the Dice of its saved predictions against
  the built labels, and beats a trivial baseline: the test labels' most
  frequent foreground class predicted everywhere."""
  assert config.eval.metric_mode == 'paper'
  source = tfds.builder(config.dataset.name,
                        data_dir=config.dataset.data_dir).as_data_source('test')
  slices = {}
  for record in source:
    slices.setdefault(record['case_id'].decode(), []).append(
        (int(record['slice_index']), record['label']))
  case_ids = sorted(slices)
  labels = [np.stack([label for _, label in sorted(
      slices[case_id], key=lambda entry: entry[0])]) for case_id in case_ids]
  classes = range(1, config.dataset.num_classes)
  # dice[i, k - 1]: case i, class k.
  dice = np.array([[_paper_dice(
      np.asarray(nib.load(out_dir / evaluate.PREDICTIONS_DIR
                          / f'{case_id}.nii.gz').dataobj).transpose(2, 1, 0)
      == k, truth == k) for k in classes]
                   for case_id, truth in zip(case_ids, labels)])
  with open(out_dir / evaluate.METRICS_FILE, newline='') as f:
    rows = list(csv.DictReader(f))
  written = np.zeros_like(dice)
  for row in rows:
    written[case_ids.index(row['case_id']),
            int(row['class_id']) - 1] = float(row['dice'])
  assert len(rows) == dice.size
  np.testing.assert_allclose(written, dice, rtol=1e-12)
  assert summary['num_cases'] == len(case_ids)
  assert summary['mean_dice'] == pytest.approx(dice.mean(axis=0).mean())
  # Class c everywhere: Dice 2|T| / (N + |T|) for c, 0 for the others (empty
  # prediction); all background would score 0.
  frequent = max(classes, key=lambda k: sum((t == k).sum() for t in labels))
  baseline = np.mean([_paper_dice(np.ones_like(truth, bool), truth == frequent)
                      for truth in labels]) / len(classes)
  assert summary['mean_dice'] > baseline


def test_speeds_keep_three_significant_digits_and_durations_read_as_clocks():
  assert train.format_speed(12.345) == '12.3 steps/s'
  assert train.format_speed(0.0123) == '0.0123 steps/s (81.3 s/step)'
  assert train.format_speed(0.0004) == '0.0004 steps/s (2.5e+03 s/step)'
  assert train.format_duration(3725.4) == '1:02:05'
  assert train.format_duration(90000) == '1 day, 1:00:00'


def test_one_logit_models_log_their_cross_entropy_as_bce(tmp_path, caplog):
  interval = [{'total': 1.0, 'ce': 0.5, 'dice': 0.25, 'scr': 0.125,
               'ifd': 0.0625, 'grad_norm': 2.0, 'learning_rate': 0.1}] * 2
  writer = metric_writers.SummaryWriter(str(tmp_path))
  names = outputs.loss_part_names(1)
  with caplog.at_level(logging.INFO):
    train._write_interval(writer, 7, 10, interval, 0.5, names)  # pylint: disable=protected-access
  writer.close()
  tags = _events(tmp_path).Tags()['tensors']
  assert 'train/bce' in tags and 'train/ce' not in tags
  assert _scalars_by_step(tmp_path, 'train/bce') == {7: 0.5}
  line = caplog.records[-1].getMessage()
  assert line == ('step 7/10  loss 1.0000  bce 0.5000  dice 0.2500  '
                  'scr 0.1250  ifd 0.0625  lr 0.1  0.5 steps/s (2 s/step)  '
                  'eta 0:00:06')


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tiny_demo_data_dir,
                                                         tmp_path):
  steps = 4
  straight = _config(tiny_demo_data_dir, num_train_steps=2 * steps,
                     checkpoint_every_steps=100)
  train.train_and_evaluate(straight, str(tmp_path / 'straight'), 'train')
  split_dir = str(tmp_path / 'split')
  train.train_and_evaluate(
      _config(tiny_demo_data_dir, num_train_steps=steps,
              checkpoint_every_steps=100), split_dir, 'train')
  train.train_and_evaluate(straight, split_dir, 'train')
  (a, step_a), (b, step_b) = (_variables(tmp_path / 'straight', straight),
                              _variables(split_dir, straight))
  assert step_a == step_b == 2 * steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(
      _scalar_series(tmp_path / 'straight', 'train/total'),
      _scalar_series(split_dir, 'train/total'))


def test_a_run_resumed_past_a_damaged_step_ends_as_the_uninterrupted_run(
    tiny_demo_data_dir, tmp_path, caplog):
  """A run stops early on validation Dice. Its copy loses the stop step's
  checkpoint to flipped bytes in a weight file (as if killed just after that
  save, the disk then damaging it), so it resumes from the validation before
  (its log interval half done) and must end as the uninterrupted run: the
  same early stop (best Dice and validations without gain restored), the
  same logged interval means across the resume point (the interval's earlier
  steps restored), the same weights."""
  config = _config(tiny_demo_data_dir, num_train_steps=16, eval_every_steps=2,
                   early_stopping_patience=1, log_every_steps=3,
                   checkpoint_every_steps=100, keep_checkpoints=10,
                   image_summary_every_steps=0)
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  train.train_and_evaluate(config, str(straight), 'train')
  with checkpoints.create_manager(straight, read_only=True) as manager:
    steps = manager.all_steps()
  stop = steps[-1]
  # Stopped early, after a validation that set the best Dice.
  assert stop < config.num_train_steps and len(steps) >= 2
  shutil.copytree(straight / checkpoints.CHECKPOINT_DIR,
                  resumed / checkpoints.CHECKPOINT_DIR)
  flip_bytes(weight_file(resumed / checkpoints.CHECKPOINT_DIR / str(stop)))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(resumed), 'train')
  warnings = [r.getMessage() for r in caplog.records
              if f'Checkpoint step {stop} ' in r.getMessage()]
  assert len(warnings) == 1 and checkpoints.CORRUPT_DIR in warnings[0]
  with checkpoints.create_manager(resumed, read_only=True) as manager:
    assert manager.all_steps() == steps
  (a, step_a), (b, step_b) = (_variables(straight, config),
                              _variables(resumed, config))
  assert step_a == step_b == stop
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  for tag in ('train/total', 'val/mean_dice'):
    logged = _scalars_by_step(resumed, tag)
    assert logged, tag
    assert logged == {step: value for step, value in
                      _scalars_by_step(straight, tag).items()
                      if step in logged}, tag


def test_a_diverging_run_stops_and_leaves_no_nonfinite_array_on_disk(
    tiny_demo_data_dir, tmp_path):
  """Each step is checked before its state is saved: the NaN step stops the
  run unsaved, with advice that fits a divergence."""
  config = _config(tiny_demo_data_dir, num_train_steps=6,
                   checkpoint_every_steps=1, log_every_steps=3,
                   keep_checkpoints=10, image_summary_every_steps=0)
  config.optimizer.learning_rate = 1e9
  with pytest.raises(train.NonFiniteLossError,
                     match='learning.rate.*grad_clip_norm.*data'):
    train.train_and_evaluate(config, str(tmp_path), 'train')
  saved = [d for d in (tmp_path / checkpoints.CHECKPOINT_DIR).iterdir()
           if d.name.isdigit()]
  assert saved
  for step_dir in saved:
    for item in ('variables', 'train'):
      arrays = ocp.StandardCheckpointer().restore(step_dir / item)
      for path, leaf in jax.tree.leaves_with_path(arrays):
        assert np.isfinite(leaf).all(), (step_dir.name, item, path)


@pytest.mark.parametrize('model', ['unet', 'swin_unet'])
def test_eight_devices_match_one_device(tiny_demo_data_dir, tmp_path, model):
  """The sharded step computes the same training as one device.

  Plain SGD with a small learning rate: the soft Dice of classes absent from
  a batch and IFD on nearly dead channels of a tiny model have gradients that
  scale with 1/(tiny denominator), so last-bit differences of cross-device
  sums (BatchNorm statistics, gradients) become 1e-4 relative gradient
  differences; Adam or a large step would amplify them past 1e-5. The updates
  stay large enough that a wrong reduction (e.g. per-device BatchNorm or a
  sum instead of a mean) is caught. SelfReg off: IFD's channel ranking flips
  between near-tied channels under such differences, a discrete change of
  the loss (measured 5e-5 relative at step 3); the SelfReg terms themselves
  are checked under sharding in test_losses.
  """
  # Both runs side by side: their compiles, which dominate, are one thread
  # each. Logs go to files (a full pipe would stall a run).
  runs = {}
  for devices in (1, 8):
    env = dict(os.environ,
               XLA_FLAGS=(os.environ['XLA_FLAGS'] +
                          f' --xla_force_host_platform_device_count={devices}'))
    workdir = tmp_path / f'{devices}dev'
    log = tmp_path / f'{devices}dev.log'
    with open(log, 'w') as stderr:
      runs[devices] = (workdir, log, subprocess.Popen(
          [sys.executable, str(ROOT / 'main.py'),
           *_main_args(model, workdir, tiny_demo_data_dir,
                       '--config.num_train_steps=3', '--mode=train',
                       '--config.checkpoint_every_steps=1',
                       '--config.image_summary_every_steps=0',
                       '--config.eval_every_steps=-1',
                       '--config.keep_checkpoints=5',
                       '--config.optimizer.name=sgd',
                       '--config.optimizer.learning_rate=0.005',
                       '--config.loss.use_selfreg=False')],
          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
  results = {}
  try:
    for devices, (workdir, log, process) in runs.items():
      process.wait(timeout=600)
      stderr = log.read_text()
      assert process.returncode == 0, stderr[-3000:]
      assert f'{devices} local / {devices} global devices' in stderr
      results[devices] = (_scalar_series(workdir, 'train/total'),
                          _variables(workdir, _config(tiny_demo_data_dir,
                                                      model))[0])
  finally:
    for _, _, process in runs.values():
      process.kill()  # only one still running: the test failed
  np.testing.assert_allclose(results[1][0], results[8][0], rtol=1e-5)
  # Per weight, the first conv layers differ by up to 3e-4 relative and the
  # BatchNorm biases (sums over all pixels that nearly cancel) by up to 5%
  # of their still tiny values; over the whole variable vector the runs
  # differ by 1.8e-5 (measured), within the bound below.
  difference = optax.tree.norm(jax.tree.map(np.subtract, results[1][1],
                                            results[8][1]))
  assert difference <= 5e-5 * optax.tree.norm(results[1][1])
  first = _variables(tmp_path / '1dev', _config(tiny_demo_data_dir, model),
                     which='1')[0]
  moved = max(float(np.abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(first['params']), jax.tree.leaves(results[1][1]['params'])))
  assert moved > 1e-3


def _logged_losses(stderr: str) -> list[str]:
  return [line.split('loss ')[1].split()[0] for line in stderr.splitlines()
          if ' loss ' in line and 'step ' in line]


def test_two_processes_train_together_and_only_process_0_logs(
    tiny_demo_data_dir, tmp_path):
  results = distributed.launch_local(
      [str(ROOT / 'main.py'),
       *_main_args('unet', tmp_path, tiny_demo_data_dir,
                   '--config.num_train_steps=3', '--mode=train')],
      num_processes=2, devices_per_process=1, timeout=600, cwd=ROOT)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'process ' in result.stderr and '2 global devices' in result.stderr
  losses = [_logged_losses(result.stderr) for result in results]
  assert len(losses[0]) == 3 and losses[0] == losses[1]
  event_files = list(tmp_path.glob('events.out.tfevents.*'))
  assert len(event_files) == 1
  assert str(results[0].pid) in event_files[0].name
  assert (tmp_path / checkpoints.CHECKPOINT_DIR / '3' / 'variables').is_dir()


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_demo_data_dir,
                                                        tmp_path):
  args = _main_args('unet', tmp_path, tiny_demo_data_dir,
                    '--config.num_train_steps=100000',
                    '--config.checkpoint_every_steps=100000', '--mode=train')
  process = subprocess.Popen([sys.executable, str(ROOT / 'main.py'), *args],
                             cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in process.stdout:
    seen.append(line)
    if 'step 5/' in line:
      process.send_signal(signal.SIGTERM)
      break
  rest, _ = process.communicate(timeout=300)
  log = ''.join(seen) + rest
  assert process.returncode == 0, log[-3000:]
  assert 'Pre-empted' in log
  with checkpoints.create_manager(tmp_path, read_only=True) as manager:
    saved = manager.latest_step()
  assert saved >= 5
  resumed = _run_main(_main_args('unet', tmp_path, tiny_demo_data_dir,
                                 f'--config.num_train_steps={saved + 2}',
                                 '--mode=train'), timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'at step {saved}.' in resumed.stderr
  with checkpoints.create_manager(tmp_path, read_only=True) as manager:
    assert manager.latest_step() == saved + 2


# RLIMIT_FSIZE of the disk-full run: above its event file and JSON items,
# below the data files of its weights and optimizer state (0.3-1 MB for the
# tiny UNet), whose writes then fail as on a full disk (EFBIG, not ENOSPC).
# Set by util-linux's prlimit, not a preexec_fn: forking a multithreaded
# (JAX) process to run Python code before exec may deadlock.
FILE_SIZE_LIMIT = 256 * 1024


def test_a_failed_save_stops_the_run_at_once_in_one_line(tiny_demo_data_dir,
                                                         tmp_path):
  """The save of step 15 fails in the background: the run stops before its
  next save (step 30, where orbax would raise it), reporting the step and
  the OS's reason in one line, none of orbax's tracebacks."""
  # A copy of the session's compilation cache: the limit may cut its writes
  # short too.
  cache = tmp_path / 'cache'
  shutil.copytree(os.environ['JAX_COMPILATION_CACHE_DIR'], cache)
  workdir = tmp_path / 'run'
  run = _run_main(_main_args('unet', workdir, tiny_demo_data_dir,
                             '--mode=train', '--config.num_train_steps=30',
                             '--config.checkpoint_every_steps=15',
                             '--config.image_summary_every_steps=0'),
                  env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache)),
                  launcher=('prlimit', f'--fsize={FILE_SIZE_LIMIT}'),
                  timeout=600)
  assert run.returncode != 0
  reports = [line for line in run.stderr.splitlines()
             if 'Saving checkpoint step 15 ' in line]
  assert len(reports) == 1, run.stderr[-3000:]
  assert 'File too large' in reports[0]
  assert 'step 30/' not in run.stderr
  # None of orbax's log records (each tagged '[process=N]', most with a
  # traceback) nor of the errors of its abandoned writes.
  for noise in ('[process=', 'Event loop is closed', 'Exception ignored',
                'exception was never retrieved', 'Traceback'):
    assert noise not in run.stderr
  assert not (workdir / checkpoints.CHECKPOINT_DIR / '15').exists()


@pytest.fixture(scope='module')
def synapse_without_validation(tmp_path_factory):
  """A TFDS data dir holding a synthetic Synapse-shaped set of the 18
  training and 12 test cases, built with --val-cases 0."""
  root = tmp_path_factory.mktemp('synapse')
  fixtures_sources.write_transunet_copy(root / 'Synapse', synapse.TRAIN_CASES,
                                        synapse.TEST_CASES)
  build.build_dataset('synapse', src=root / 'Synapse', data_dir=root / 'tfds',
                      val_cases=0)
  return root / 'tfds'


def _synapse_paper_config(data_dir):
  """The Synapse Swin-UNet recipe (protocol 'paper') with the tiny UNet."""
  config = synapse_swin.get_config()
  config.model = tiny_configs.tiny_unet()
  config.model.num_classes = config.dataset.num_classes
  config.dataset.update(data_dir=str(data_dir),
                        image_size=tiny_configs.IMAGE_SIZES[0])
  config.loss.use_selfreg = False  # the protocol is under test, not the loss
  config.update(batch_size=8, num_epochs=3, log_every_steps=5,
                image_summary_every_steps=0, checkpoint_every_steps=1000,
                keep_checkpoints=1)
  config.eval.update(batch_size=8, checkpoint='epoch:2')
  return config


def test_synapse_paper_protocol_trains_on_all_cases_and_tests_the_fixed_epoch(
    synapse_without_validation, tmp_path, caplog):
  config = _synapse_paper_config(synapse_without_validation)
  assert config.protocol == 'paper'
  with caplog.at_level(logging.INFO):
    summary = train.train_and_evaluate(config, str(tmp_path))
  # All 18 training cases; ceil(N / B) steps per epoch (36 = 4 x 8 + 4).
  slices = len(synapse.TRAIN_CASES) * fixtures_sources.SLICES_PER_CASE
  epoch_steps = -(-slices // config.batch_size)
  assert (slices, epoch_steps) == (36, 5)
  expected = dict(protocol='paper', train_slices=slices,
                  steps_per_epoch=epoch_steps, checkpoint='epoch:2',
                  epoch=2.0, step=2 * epoch_steps,
                  num_cases=len(synapse.TEST_CASES))
  assert {key: summary[key] for key in expected} == expected
  saved = json.loads(
      (tmp_path / evaluate.EVAL_DIR / f'test_step{2 * epoch_steps}' /
       evaluate.SUMMARY_FILE).read_text())
  assert {key: saved[key] for key in expected} == expected
  # The tested step is kept besides the last one (keep_checkpoints=1).
  with checkpoints.create_manager(tmp_path, read_only=True) as manager:
    assert manager.all_steps() == [2 * epoch_steps, 3 * epoch_steps]
  log = [r.getMessage() for r in caplog.records]
  assert any(m.startswith(f"Protocol 'paper': {slices} training slices ")
             for m in log)
  assert not any(m.startswith('Evaluation of validation') for m in log)
  assert not any(tag.startswith('val/')
                 for tag in _events(tmp_path).Tags()['tensors'])


def test_protocols_refuse_data_sets_built_for_the_other_one(
    synapse_without_validation, tiny_demo_data_dir, tmp_path):
  config = _synapse_paper_config(synapse_without_validation)
  config.protocol = 'validated'
  with pytest.raises(cli.UserError, match=(
      "config.protocol='validated' validates on split 'validation', which "
      '.*selfreg_synapse.* does not have')):
    train.train_and_evaluate(config, str(tmp_path / 'validated'))
  config = _config(tiny_demo_data_dir, protocol='paper')
  config.eval.checkpoint = 'latest'
  with pytest.raises(cli.UserError, match=(
      "config.protocol='paper' trains on every training case, but .* keeps "
      r"\d+ slices out of training in split 'validation'; build the set with "
      '--val-cases 0')):
    train.train_and_evaluate(config, str(tmp_path / 'paper'))
  config = _synapse_paper_config(synapse_without_validation)
  config.update(num_epochs=-1, num_train_steps=4)
  config.eval.checkpoint = 'epoch:1'
  with pytest.raises(cli.UserError, match=(
      r"config.eval.checkpoint='epoch:1' is step 5, but the run trains steps "
      r'1 to 4 \(5 per epoch\)')):
    train.train_and_evaluate(config, str(tmp_path / 'short'))
  assert not list(tmp_path.rglob('checkpoints'))


@pytest.mark.parametrize('overrides,message', [
    (dict(protocol='paper'), "config.eval.checkpoint='best' selects by "
     "validation Dice, but config.protocol='paper' runs no validation"),
    (dict(protocol='paper', early_stopping_patience=3, checkpoint='latest'),
     "config.early_stopping_patience=3 counts validations, which "
     "config.protocol='paper' does not run"),
    (dict(checkpoint='epoch:0'), "config.eval.checkpoint 'epoch:0': write "
     'epoch:N with N >= 1'),
    (dict(checkpoint='epoch:151'), "config.eval.checkpoint='epoch:151' is "
     r'after the last epoch \(config.num_epochs=150\)'),
    (dict(checkpoint='final'), "config.eval.checkpoint='final': choose "),
    (dict(protocol='paperr'), "config.protocol='paperr': choose one of"),
])
def test_protocol_settings_that_cannot_work_are_refused(overrides, message):
  config = synapse_swin.get_config()
  config.eval.checkpoint = overrides.pop('checkpoint', 'best')
  config.update(overrides)
  with pytest.raises(configuration.ConfigError, match=message):
    configuration.validate(config, device_count=1, process_count=1)
