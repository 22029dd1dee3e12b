"""Training loop: one jit-compiled step over a data-parallel device mesh.

The batch is sharded over the mesh axis 'data' (every device of every
process); parameters, BatchNorm statistics and optimizer state are
replicated, so BatchNorm sees the global batch. Batches are transferred to
the devices ahead of their steps (config.prefetch_to_device); the loop reads
each step's metrics while the next step runs, so the host never waits for
the devices between steps except to log, validate or save. Checkpoints
(orbax), logs (CLU: TensorBoard event files + console) and validation live
in the workdir; a run resumes from its newest intact checkpoint, data order,
random keys and the loop's own state (`LoopState`: early stopping, the log
interval in progress) included. A step's metrics are checked finite before
its state is logged or saved, so no checkpoint holds a diverged state.
"""

import dataclasses
import datetime
import functools
import pathlib
import signal
import threading
import time
from typing import Any, Collection

from absl import logging
from clu import metric_writers
import flax.struct
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from selfreg_jax.common import cli
from selfreg_jax.core import checkpoints
from selfreg_jax.core import configuration
from selfreg_jax.core import context
from selfreg_jax.core import input_pipeline
from selfreg_jax.core import losses
from selfreg_jax.core import outputs
from selfreg_jax.core import sharding
from selfreg_jax.evaluation import evaluate
from selfreg_jax.evaluation import visualize
from selfreg_jax.interop import pretrained

IMAGES_PER_SUMMARY = 3


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> dict[str, Any]:
    """The model variables (what evaluation and checkpoints' 'variables' hold)."""
    if self.batch_stats:
      return {'params': self.params, 'batch_stats': self.batch_stats}
    return {'params': self.params}


class NonFiniteLossError(FloatingPointError):
  """A loss part, the gradient norm or the train state became NaN or Inf."""


@dataclasses.dataclass
class LoopState:
  """The training loop's own state, saved with each checkpoint (as JSON).

  Attributes:
    best_val_dice: the highest validation mean Dice so far; None before the
      first validation.
    validations_without_gain: validations since the best one (what
      config.early_stopping_patience counts).
    interval_metrics: the per-step training metrics since the last log line
      (its scalars are their means).
  """
  best_val_dice: float | None = None
  validations_without_gain: int = 0
  interval_metrics: list[dict[str, float]] = dataclasses.field(
      default_factory=list)

  def record_validation(self, mean_dice: float) -> None:
    if self.best_val_dice is None or mean_dice > self.best_val_dice:
      self.best_val_dice, self.validations_without_gain = mean_dice, 0
    else:
      self.validations_without_gain += 1


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  opt = config.optimizer
  if opt.schedule == 'constant':
    return optax.constant_schedule(opt.learning_rate)
  if opt.schedule == 'poly':
    return optax.polynomial_schedule(opt.learning_rate, 0.0, opt.poly_power,
                                     total_steps)
  period = opt.restart_epochs * steps_per_epoch

  def cosine_restarts(step):
    phase = (step % period) / period
    return opt.min_learning_rate + 0.5 * (
        opt.learning_rate - opt.min_learning_rate) * (1 + jnp.cos(jnp.pi * phase))
  return cosine_restarts


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """The recipe's optimizer (PyTorch semantics for SGD weight decay)."""
  opt = config.optimizer
  if opt.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                     optax.sgd(schedule, momentum=opt.momentum))
  elif opt.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    tx = optax.adam(schedule)
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def initial_state(model, tx, config, key: jax.Array) -> TrainState:
  size = config.dataset.image_size
  dummy = jnp.zeros((1, size, size, config.dataset.in_channels), jnp.float32)
  variables = model.init({'params': key, 'dropout': key}, dummy)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model, tx,
               loss_config: dict[str, Any], base_key: jax.Array
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step; returns the new state and scalar metrics.

  batch: {'image': (B, S, S, C) float32, 'label': (B, S, S) int32}, B global.
  The step's random keys (dropout / stochastic depth, SelfReg channel draws)
  are folded from the step number, so a resumed run draws the same ones.
  """
  step_key = jax.random.fold_in(base_key, state.step)
  dropout_key, selfreg_key = jax.random.split(step_key)

  def loss_fn(params):
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    (logits, features), updates = model.apply(
        variables, batch['image'], train=True, mutable=['batch_stats'],
        rngs={'dropout': dropout_key})
    loss, parts = losses.total_loss(logits, batch['label'], features,
                                    selfreg_key, loss_config)
    return loss, (parts, updates.get('batch_stats', {}))

  (_, (parts, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(parts, grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=params,
                       batch_stats=batch_stats, opt_state=opt_state), metrics


def jit_train_step(model, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, loss_config: dict[str, Any],
                   base_key: jax.Array, mesh: jax.sharding.Mesh):
  """The training loop's step: `train_step` jit-compiled over `mesh`.

  Returns:
    step(state, batch) -> (state, metrics). The state is replicated and
    donated (its buffers are reused for the new state); the batch is split
    along axis 0 over the mesh axis 'data'. The metrics are `train_step`'s
    plus learning_rate, the rate this step applied; all stay on the devices
    until read.
  """
  replicated = sharding.replicated_sharding(mesh)

  def step_with_learning_rate(state, batch):
    new_state, metrics = train_step(state, batch, model=model, tx=tx,
                                    loss_config=loss_config,
                                    base_key=base_key)
    return new_state, dict(metrics, learning_rate=schedule(state.step))

  return jax.jit(step_with_learning_rate,
                 in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


# What to do about a NaN or Inf, in the error that stops the run.
_NONFINITE_ADVICE = (
    'Lower optimizer.learning_rate, set optimizer.grad_clip_norm or check '
    'the data, then rerun: checkpoints never hold non-finite values, so the '
    'run resumes from its last one, if any.')


def check_finite(step: int, metrics: dict[str, float]) -> None:
  bad = sorted(name for name, value in metrics.items()
               if not np.isfinite(value))
  if bad:
    raise NonFiniteLossError(
        f'Step {step}: non-finite {", ".join(bad)} '
        f'({", ".join(f"{k}={metrics[k]}" for k in bad)}); stopping. '
        + _NONFINITE_ADVICE)


class PreemptionWatcher:
  """Notices SIGTERM (pre-emption) so that the loop can save and exit."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM,
                                     lambda *_: self._event.set())

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
  """How long a run trains, in the public trainers' units.

  Attributes:
    num_slices: slices of the training split.
    steps_per_epoch: ceil(num_slices / batch size).
    total_steps: config.num_train_steps, else num_epochs whole epochs.
    tested_step: the step config.eval.checkpoint names ('epoch:N' or a step
      number), which training saves and keeps; None for 'best' and 'latest'.
  """
  num_slices: int
  steps_per_epoch: int
  total_steps: int
  tested_step: int | None


def plan_training(ctx: context.RunContext) -> TrainingPlan:
  """Checks the data set's splits against config.protocol and plans the run.

  Raises:
    UserError: 'validated' on a set without the validation split, 'paper'
      on a set whose validation split holds cases out of training, or an
      evaluated step after the run's last step.
  """
  config, data = ctx.config, ctx.data
  val_split = config.dataset.val_split
  if config.protocol == 'validated' and not data.has_split(val_split):
    raise cli.UserError(
        f"config.protocol='validated' validates on split {val_split!r}, "
        f'which {data.directory} does not have (built without validation '
        'cases); use --config.protocol=paper, or build the set with '
        'validation cases into another --out.')
  if config.protocol == 'paper' and data.has_split(val_split):
    raise cli.UserError(
        f"config.protocol='paper' trains on every training case, but "
        f'{data.directory} keeps {data.num_slices(val_split)} slices '
        f'out of training in split {val_split!r}; build the set with '
        '--val-cases 0 (demo: --option num_validation_cases=0) into another '
        '--out, or use --config.protocol=validated.')
  num_slices = data.num_slices(config.dataset.train_split)
  epoch_steps = input_pipeline.steps_per_epoch(num_slices, config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * epoch_steps)
  plan = TrainingPlan(num_slices, epoch_steps, total_steps,
                      _tested_step(config, epoch_steps, total_steps))
  _log_plan(config, plan)
  return plan


def _tested_step(config: ml_collections.ConfigDict, epoch_steps: int,
                 total_steps: int) -> int | None:
  """`TrainingPlan.tested_step`; UserError if after the run's last step."""
  which = str(config.eval.checkpoint)
  epoch = checkpoints.selected_epoch(which)
  if epoch is not None:
    step = epoch * epoch_steps
  elif which.isdigit():
    step = int(which)
  else:
    return None
  if not 0 < step <= total_steps:
    raise cli.UserError(
        f'config.eval.checkpoint={which!r} is step {step}, but the run '
        f'trains steps 1 to {total_steps} ({epoch_steps} per epoch).')
  return step


def _train_arrays(state: TrainState) -> dict[str, Any]:
  """The array items of a checkpoint: 'variables' and 'train'."""
  return {'variables': state.variables(),
          'train': {'step': state.step, 'opt_state': state.opt_state}}


def _save(manager, step: int, state: TrainState, iterator, config,
          loop: LoopState, metrics=None) -> None:
  """Saves a checkpoint of `step`, whose metrics have been checked finite.

  Raises:
    NonFiniteLossError: the state itself holds a NaN or Inf (e.g. an
      overflowing BatchNorm variance under a finite loss); nothing is saved.
  """
  arrays = _train_arrays(state)
  nonfinite = checkpoints.nonfinite_arrays(arrays)
  if nonfinite:
    raise NonFiniteLossError(
        f'Step {step}: non-finite values in the train state '
        f'({checkpoints.short_list(nonfinite)}); not saved, stopping. '
        + _NONFINITE_ADVICE)
  manager.save(step, args=checkpoints.save_args(
      arrays, data=grain.checkpoint.CheckpointSave(iterator),
      loop=ocp.args.JsonSave(dataclasses.asdict(loop)),
      config=ocp.args.JsonSave(config.to_dict())), metrics=metrics, force=True)


def _restore(manager, abstract: TrainState, iterator
             ) -> tuple[int, TrainState, LoopState] | None:
  """Restores the newest intact checkpoint: (step, state, loop state).

  Newer damaged steps are moved aside (`checkpoints.restore_newest_intact`);
  None without checkpoints. Checkpoints saved before the loop state was
  checkpointed give a fresh LoopState.
  """
  found = checkpoints.restore_newest_intact(
      manager, _train_arrays(abstract), optional=('loop',),
      data=grain.checkpoint.CheckpointRestore(iterator))
  if found is None:
    return None
  step, restored = found
  variables, train = restored['variables'], restored['train']
  state = TrainState(step=train['step'], params=variables['params'],
                     batch_stats=variables.get('batch_stats', {}),
                     opt_state=train['opt_state'])
  return step, state, LoopState(**restored.get('loop', {}))


@functools.lru_cache(maxsize=8)
def _summary_predictor(model):
  """Jit-compiled class maps of the first IMAGES_PER_SUMMARY images.

  Cached per model, so later runs in the same process reuse its compilation.
  """

  def predict_summary_images(variables, images):
    return outputs.class_map(
        model.apply(variables, images[:IMAGES_PER_SUMMARY])[0])

  return jax.jit(predict_summary_images)


def _summary_images(model, variables, batch) -> np.ndarray:
  """(N, S, 3S, 3) [input | prediction | truth] strips of a training batch.

  Shows the first N = min(IMAGES_PER_SUMMARY, per-device batch) images of
  the part of the global `batch` on this process's first device, predicted
  there (no collective), so processes need not agree on the images.
  """
  local_variables, local_batch = jax.tree.map(
      lambda x: x.addressable_data(0), (variables, batch))
  images, labels, predictions = jax.device_get(
      (local_batch['image'], local_batch['label'],
       _summary_predictor(model)(local_variables, local_batch['image'])))
  return np.stack([visualize.comparison_strip(i, p, t) for i, p, t in zip(
      images[:IMAGES_PER_SUMMARY], predictions, labels)])


def _early_stopping_reached(config: ml_collections.ConfigDict,
                            loop: LoopState) -> bool:
  return (config.early_stopping_patience > 0 and
          loop.validations_without_gain >= config.early_stopping_patience)


def format_speed(steps_per_sec: float) -> str:
  """'12.3 steps/s'; below one step per second '0.0521 steps/s (19.2 s/step)'
  (three significant digits: never rounded to 0)."""
  text = f'{steps_per_sec:.3g} steps/s'
  if steps_per_sec < 1:
    text += f' ({1 / steps_per_sec:.3g} s/step)'
  return text


def format_duration(seconds: float) -> str:
  """Whole seconds as '[D day[s], ]H:MM:SS'."""
  return str(datetime.timedelta(seconds=round(seconds)))


def _write_interval(writer, step: int, total_steps: int,
                    interval_metrics: list[dict[str, float]],
                    steps_per_sec: float, names: dict[str, str]) -> None:
  """Logs the means of a log interval's training metrics at its last step,
  its speed (`steps_per_sec`, step time only) and the time left at it.

  The learning rate is the interval's last step's, not the interval's mean.
  """
  means = {names.get(k, k): float(np.mean([m[k] for m in interval_metrics]))
           for k in interval_metrics[0]}
  means['learning_rate'] = interval_metrics[-1]['learning_rate']
  means['steps_per_sec'] = steps_per_sec
  writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
  parts = '  '.join(f'{name} {means[name]:.4f}' for name in names.values())
  logging.info('step %d/%d  loss %.4f  %s  lr %.3g  %s  eta %s', step,
               total_steps, means['total'], parts, means['learning_rate'],
               format_speed(steps_per_sec),
               format_duration((total_steps - step) / steps_per_sec))


def _log_plan(config: ml_collections.ConfigDict, plan: TrainingPlan) -> None:
  """The first lines of a run's log: protocol, data, epochs, tested step."""
  logging.info(
      "Protocol '%s': %d training slices in split '%s', %d steps per epoch "
      '(ceil(%d / batch %d)), %d steps (%.4g epochs).', config.protocol,
      plan.num_slices, config.dataset.train_split, plan.steps_per_epoch,
      plan.num_slices, config.batch_size, plan.total_steps,
      plan.total_steps / plan.steps_per_epoch)
  which = str(config.eval.checkpoint)
  if config.protocol == 'paper':
    chosen = ('the last step' if plan.tested_step is None
              else f'step {plan.tested_step}')
    logging.info("No validation split and no validation; the test split is "
                 'evaluated at checkpoint %r (%s).', which, chosen)
  else:
    every = {0: 'at the end', -1: 'never'}.get(
        config.eval_every_steps, f'every {config.eval_every_steps} steps')
    logging.info("Validation on split '%s' %s; the test split is evaluated "
                 'at checkpoint %r.', config.dataset.val_split, every, which)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mode: str = 'train_and_eval',
                       overridden: Collection[str] = ()) -> dict[str, Any]:
  """Trains (resuming from `workdir`), validates, and evaluates the best step.

  Args:
    config: experiment config (see configs/base.py).
    workdir: run folder: checkpoints/, TensorBoard events, eval/ outputs.
    mode: 'train', 'eval' (evaluate a checkpoint of the workdir only) or
      'train_and_eval'.
    overridden: dotted config keys set on the command line (a model field
      among them must equal the model of the run's checkpoints, if any).

  Returns:
    The final evaluation summary (empty for mode='train' and for a
    pre-empted run).
  """
  ctx = context.create(config, mode, workdir=workdir, overridden=overridden)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  if mode != 'eval' and not train(ctx, pathlib.Path(workdir)):
    return {}
  if mode == 'train':
    return {}
  return evaluate.evaluate_checkpoint(ctx, workdir)


def train(ctx: context.RunContext, workdir: pathlib.Path) -> bool:
  """Trains the context's model in `workdir`, from its newest intact
  checkpoint if any; returns False if pre-empted (SIGTERM; saved first)."""
  config = ctx.config
  plan = plan_training(ctx)
  schedule = learning_rate_schedule(config, plan.steps_per_epoch,
                                    plan.total_steps)
  tx = create_optimizer(config, schedule)
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  batches = input_pipeline.prefetch_to_device(
      input_pipeline.create_train_loader(config, ctx.data),
      config.prefetch_to_device, ctx.batch_sharding)
  manager = checkpoints.create_manager(
      workdir, keep_last=config.keep_checkpoints,
      keep_steps=() if plan.tested_step is None else (plan.tested_step,))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  preemption = PreemptionWatcher()
  try:
    first_step, state, loop = _start(ctx, tx, init_key, manager, batches)
    if first_step == 0:
      writer.write_hparams(_flat_hparams(config))
    step_fn = jit_train_step(ctx.model, tx, schedule, dict(config.loss),
                             base_key, ctx.mesh)
    return _loop(ctx, plan, step_fn, first_step, state, loop, batches,
                 manager, writer, preemption)
  finally:
    checkpoints.close(manager)
    batches.close()
    preemption.close()
    writer.flush()


def _start(ctx: context.RunContext, tx: optax.GradientTransformation,
           init_key: jax.Array, manager, batches
           ) -> tuple[int, TrainState, LoopState]:
  """(first step, state, loop state): restored from the newest intact
  checkpoint (data order included), else initialised (and loaded with the
  ImageNet weights of config.init.pretrained)."""
  config = ctx.config
  init_fn = jax.jit(functools.partial(initial_state, ctx.model, tx, config),
                    out_shardings=ctx.replicated)
  if manager.all_steps():
    abstract = sharding.replicated_shapes(jax.eval_shape(init_fn, init_key),
                                         ctx.mesh)
    found = _restore(manager, abstract, batches)
    if found is not None:
      logging.info('Resumed from %s at step %d.', manager.directory, found[0])
      return found
  state = init_fn(init_key)
  if config.init.pretrained:
    variables, _ = pretrained.load_swin_imagenet(
        config.init.pretrained, state.variables(), config.model,
        load_final_norm=config.init.load_final_norm)
    state = state.replace(params=jax.device_put(variables['params'],
                                                ctx.replicated))
  return 0, state, LoopState()


def _loop(ctx: context.RunContext, plan: TrainingPlan, step_fn,
          first_step: int, state: TrainState, loop: LoopState, batches,
          manager, writer, preemption: PreemptionWatcher) -> bool:
  """Runs steps first_step + 1 .. plan.total_steps (or to early stopping):
  logs, validates, saves; returns False if pre-empted (after saving)."""
  config = ctx.config
  names = ctx.loss_part_names
  validates = config.protocol == 'validated'
  total_steps = plan.total_steps
  pending = None
  save_unconfirmed = False
  stop_early = _early_stopping_reached(config, loop)
  if stop_early:
    logging.info('Early stopping was reached at step %d: not training '
                 'further.', first_step)
  logging.info('Training %s on %s for %d steps (%d per epoch), global batch '
               '%d over %d devices.', config.model.name, config.dataset.name,
               total_steps, plan.steps_per_epoch, config.batch_size,
               jax.device_count())
  # Step time: the wall time of a log interval less the validations, image
  # summaries and saves in it (`paused`); compilation is timed apart.
  compiled_step = None
  interval_first_step, paused = first_step, 0.0
  step = first_step
  while step < total_steps and not stop_early:
    batch = next(batches)
    if compiled_step is None:
      compiled_step = _compile(step_fn, state, batch)
      interval_start = time.time()
    state, metrics = compiled_step(state, batch)
    # Read the previous step's metrics while this one runs.
    if pending is not None:
      loop.interval_metrics.append(_fetch_checked(*pending))
    pending = (step + 1, metrics)
    step += 1
    if save_unconfirmed and not manager.is_saving_in_progress():
      # A save that failed in the background stops the run now, not at
      # the next save (which would wait for it).
      checkpoints.wait_for_saves(manager)
      save_unconfirmed = False

    is_last = step == total_steps
    validate = validates and (
        (config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
        or (is_last and config.eval_every_steps >= 0))
    preempted = preemption.reached(step)
    save = (validate or is_last or preempted or step == plan.tested_step
            or step % config.checkpoint_every_steps == 0)
    log = step % config.log_every_steps == 0 or step == 1 or is_last
    if log or save:
      # This step's own metrics are checked before its state is logged or
      # saved, so that no checkpoint holds a diverged state.
      loop.interval_metrics.append(_fetch_checked(*pending))
      pending = None
    if log:
      seconds = time.time() - interval_start - paused
      _write_interval(writer, step, total_steps, loop.interval_metrics,
                      (step - interval_first_step) / max(seconds, 1e-9),
                      names)
      loop.interval_metrics = []
      interval_start, interval_first_step, paused = time.time(), step, 0.0
    pause_start = time.time()
    if (config.image_summary_every_steps
        and step % config.image_summary_every_steps == 0):
      writer.write_images(step, {'train/input_prediction_truth':
                                 _summary_images(ctx.model, state.variables(),
                                                 batch)})

    eval_metrics = None
    if validate:
      summary = evaluate.evaluate_split(ctx, state.variables(),
                                        config.dataset.val_split, step=step)
      writer.write_scalars(step, {
          f'val/{k}': v for k, v in evaluate.summary_scalars(summary).items()})
      eval_metrics = {checkpoints.BEST_METRIC: summary['mean_dice']}
      loop.record_validation(summary['mean_dice'])
    stop_early = _early_stopping_reached(config, loop)
    if save:
      _save(manager, step, state, batches, config, loop, eval_metrics)
      save_unconfirmed = True
    paused += time.time() - pause_start
    if preempted:
      logging.warning('Pre-empted (SIGTERM) at step %d: checkpoint saved, '
                      'exiting; rerun the same command to resume.', step)
      checkpoints.wait_for_saves(manager)
      return False
    if stop_early:
      logging.info('Early stopping at step %d: validation Dice has not '
                   'improved for %d validations.', step,
                   loop.validations_without_gain)
  if pending is not None:
    _fetch_checked(*pending)
  checkpoints.wait_for_saves(manager)
  return True


def _compile(step_fn, state: TrainState, batch):
  """`step_fn` compiled for `state` and `batch`, its compile time logged
  apart from the step time."""
  start = time.time()
  compiled = step_fn.lower(state, batch).compile()
  logging.info('Compiled the train step in %.1f s (not counted in steps/s).',
               time.time() - start)
  return compiled


def _fetch_checked(step: int, metrics) -> dict[str, float]:
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  check_finite(step, values)
  return values


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config by dotted key, for TensorBoard's hparams: values other than
  int, float, str and bool (e.g. tuples, None) become their str."""
  return {key: value if isinstance(value, (int, float, str, bool))
          else str(value)
          for key, value in configuration.flatten(config).items()}
