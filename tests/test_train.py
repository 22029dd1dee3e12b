"""End-to-end training: logs, checkpoints, resume, multi-device, multi-process."""

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import tiny_train_config
from selfreg_jax import checkpoints
from selfreg_jax import distributed
from selfreg_jax import train
from selfreg_jax.models import create_model
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
    tiny_demo_data_dir, tmp_path):
  config = _config(tiny_demo_data_dir, num_train_steps=30, log_every_steps=5,
                   image_summary_every_steps=10)
  config.optimizer.learning_rate = 3e-3
  summary = train.train_and_evaluate(config, str(tmp_path), 'train_and_eval')
  losses = _scalar_series(tmp_path, 'train/total')
  assert len(losses) == 6
  assert losses[-1] < 0.8 * losses[0]
  tags = _events(tmp_path).Tags()['tensors']
  for tag in ('train/ce', 'train/dice', 'train/scr', 'train/ifd',
              'train/learning_rate', 'train/grad_norm',
              'train/steps_per_sec', 'train/input_prediction_truth',
              'val/mean_dice'):
    assert tag in tags, tag
  images = _events(tmp_path).Tensors('train/input_prediction_truth')
  assert len(images) == 3
  assert (tmp_path / checkpoints.CHECKPOINT_DIR / '30' / 'variables').is_dir()
  assert 0.0 <= summary['mean_dice'] <= 1.0


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
  results = {}
  for devices in (1, 8):
    env = dict(os.environ,
               XLA_FLAGS=(os.environ['XLA_FLAGS'] +
                          f' --xla_force_host_platform_device_count={devices}'))
    workdir = tmp_path / f'{devices}dev'
    run = _run_main(_main_args(model, workdir, tiny_demo_data_dir,
                               '--config.num_train_steps=3', '--mode=train',
                               '--config.checkpoint_every_steps=1',
                               '--config.image_summary_every_steps=0',
                               '--config.eval_every_steps=-1',
                               '--config.keep_checkpoints=5',
                               '--config.optimizer.name=sgd',
                               '--config.optimizer.learning_rate=0.005',
                               '--config.loss.use_selfreg=False'),
                    env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'{devices} local / {devices} global devices' in run.stderr
    results[devices] = (_scalar_series(workdir, 'train/total'),
                        _variables(workdir, _config(tiny_demo_data_dir,
                                                    model))[0])
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
