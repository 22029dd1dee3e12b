"""The training loop compiles each program once and never waits on transfers.

Compilations are counted with JAX's monitoring event for XLA compiles (it
fires for every executable built, persistent-cache hits included) and placed
on the loop's timeline by its own log lines ('step k/N', 'Evaluation of').
"""

import collections
import contextlib
import functools
import logging as python_logging
import re
import warnings

from absl import logging
import jax
import numpy as np

import tiny_train_config
from selfreg_jax import train
from selfreg_jax.core import context
from selfreg_jax.core import input_pipeline

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
RUN_STEPS = 4
# Validation, an image summary and a checkpoint every EVAL_EVERY steps.
EVAL_EVERY = 2
STEADY_STEPS = 4
# The loop's programs: a fresh run compiles each once.
INIT = 'jit(initial_state)'
STEP = 'jit(step_with_learning_rate)'
VALIDATION = 'jit(predict_classes)'
SUMMARY = 'jit(predict_summary_images)'
PROGRAMS = (INIT, STEP, VALIDATION, SUMMARY)
# Eager ops that create and split the run's PRNG key, compiled once per
# process (on jax 0.10.2: stage, _threefry_seed, _threefry_split, unstack).
MAX_KEY_OPS = 4
_STEP_LINE = re.compile(r'^step (\d+)/')
EVAL_MARK = ('eval', None)


def _config(data_dir):
  config = tiny_train_config.get_config('unet')
  config.dataset.data_dir = str(data_dir)
  config.update(num_train_steps=RUN_STEPS, log_every_steps=1,
                eval_every_steps=EVAL_EVERY,
                image_summary_every_steps=EVAL_EVERY,
                checkpoint_every_steps=EVAL_EVERY)
  # The SelfReg terms are more traced ops of the same step program, their
  # channel draws keyed inside it, so they add no compilation or transfer;
  # left out, the step compiles in half the time on XLA:CPU.
  config.loss.use_selfreg = False
  return config


class _ProgressHandler(python_logging.Handler):
  """Appends the loop's progress lines to a timeline as marks."""

  def __init__(self, timeline):
    super().__init__()
    self._timeline = timeline

  def emit(self, record):
    message = record.getMessage()
    if match := _STEP_LINE.match(message):
      self._timeline.append(('step', int(match.group(1))))
    elif message.startswith('Evaluation of '):
      self._timeline.append(EVAL_MARK)


@contextlib.contextmanager
def _recording():
  """Yields a list that collects ('compile', name) and progress marks."""
  timeline = []

  def on_duration(event, duration_secs, **kwargs):
    del duration_secs
    if event == COMPILE_EVENT:
      timeline.append(('compile', kwargs['fun_name']))

  handler = _ProgressHandler(timeline)
  absl_logger = logging.get_absl_logger()
  # The logger's own level, restored as it was (often unset): restoring
  # get_verbosity() would pin it to the root's WARNING for later tests.
  level = absl_logger.level
  absl_logger.setLevel(python_logging.INFO)
  absl_logger.addHandler(handler)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    yield timeline
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    absl_logger.removeHandler(handler)
    absl_logger.setLevel(level)


def _compiled(timeline) -> list[str]:
  return [name for kind, name in timeline if kind == 'compile']


def _after(timeline, mark):
  return timeline[timeline.index(mark) + 1:]


def _donation_warnings(caught) -> list[str]:
  return [str(w.message) for w in caught if 'donat' in str(w.message)]


def test_runs_compile_once_then_never_across_steps_validation_and_resume(
    tiny_demo_data_dir, tmp_path):
  config = _config(tiny_demo_data_dir)
  # Start from empty in-memory caches (the persistent cache still serves the
  # executables), so that every program's first compilation is seen.
  jax.clear_caches()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    with _recording() as fresh:
      train.train_and_evaluate(config, str(tmp_path), 'train')
    config.num_train_steps = 2 * RUN_STEPS
    with _recording() as resumed:
      train.train_and_evaluate(config, str(tmp_path), 'train')

  assert [m for m in fresh if m[0] == 'step'] == [
      ('step', k) for k in range(1, RUN_STEPS + 1)]
  assert fresh.count(EVAL_MARK) == RUN_STEPS // EVAL_EVERY
  # A fresh run compiles initialization, the step, the validation predictor
  # and the summary predictor once each (the predictors at the first
  # validation step), and the PRNG key's eager ops before step 1 ends.
  compiled = _compiled(fresh)
  before_step_1 = _compiled(fresh[:fresh.index(('step', 1))])
  assert collections.Counter(
      name for name in compiled if name in PROGRAMS) == dict.fromkeys(
          PROGRAMS, 1)
  key_ops = [name for name in compiled if name not in PROGRAMS]
  assert key_ops == [name for name in before_step_1 if name not in PROGRAMS]
  assert len(key_ops) <= MAX_KEY_OPS, key_ops
  # Then nothing: the remaining steps, validations, summaries and saves.
  assert _compiled(_after(fresh, EVAL_MARK)) == []

  # The resumed run builds its own step function (one compilation, served by
  # the persistent cache when it is on); restoring the checkpoint, validation
  # and summaries compile nothing (the predictors are cached per model), and
  # nothing compiles after its first step.
  assert [m for m in resumed if m[0] == 'step'] == [
      ('step', k) for k in range(RUN_STEPS + 1, 2 * RUN_STEPS + 1)]
  assert _compiled(resumed) == [STEP]
  assert _compiled(_after(resumed, ('step', RUN_STEPS + 1))) == []
  assert _donation_warnings(caught) == []


def test_steady_state_steps_make_no_implicit_transfer_and_no_compilation(
    tiny_demo_data_dir):
  """Batch dispatch, step and metric reads under transfer_guard('disallow').

  Batches come from `prefetch_to_device` (explicit transfers) and metrics are
  read one step late with `jax.device_get`, as in the loop. On CPU, device
  buffers are host memory and device-to-host reads are not guarded; on GPU
  and TPU, any implicit read (float(), np.asarray) would raise here too.
  """
  config = _config(tiny_demo_data_dir)
  ctx = context.create(config, 'train')
  mesh, model = ctx.mesh, ctx.model
  schedule = train.learning_rate_schedule(
      config, input_pipeline.steps_per_epoch(
          ctx.data.num_slices(config.dataset.train_split), config.batch_size),
      config.num_train_steps)
  tx = train.create_optimizer(config, schedule)
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  state = jax.jit(functools.partial(train.initial_state, model, tx, config),
                  out_shardings=ctx.replicated)(init_key)
  step_fn = train.jit_train_step(model, tx, schedule, dict(config.loss),
                                 base_key, mesh)
  batches = input_pipeline.prefetch_to_device(
      input_pipeline.create_train_loader(config, ctx.data),
      config.prefetch_to_device, ctx.batch_sharding)
  state, pending = step_fn(state, next(batches))

  read = []
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    with _recording() as timeline, jax.transfer_guard('disallow'):
      for _ in range(STEADY_STEPS):
        donated = state
        state, metrics = step_fn(state, next(batches))
        read.append(jax.device_get(pending))
        pending = metrics
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated))
  read.append(jax.device_get(pending))
  batches.close()

  assert _compiled(timeline) == []
  assert _donation_warnings(caught) == []
  assert int(jax.device_get(state.step)) == STEADY_STEPS + 1
  for values in read:
    assert all(np.isfinite(v) for v in values.values())
    assert values['learning_rate'] == np.float32(
        config.optimizer.learning_rate)
