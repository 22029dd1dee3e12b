"""Checks a run's config before anything is compiled or read.

Unknown keys are already refused while the flags are parsed (configs are
locked and `--config.x=y` must name an existing field; see cli.py); this
module checks values and their consistency, naming the offending key. It
also holds `flatten`, the {dotted key: value} view of a config that the
checks, sweeps, reports and TensorBoard hparams share.
"""

import math
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from selfreg_jax.common import cli
from selfreg_jax.core import checkpoints
from selfreg_jax.core import outputs
from selfreg_jax.core.models import MODELS
from selfreg_jax.core.models import unet
from selfreg_jax.core.models.swin_unet import stage_windows

MODES = ('train', 'eval', 'train_and_eval')
# config.protocol: 'paper' trains on every training case without validation
# and evaluates a fixed checkpoint; 'validated' validates on a split held out
# of training and evaluates the best step by validation Dice.
PROTOCOLS = ('paper', 'validated')
CHOICES = {
    'optimizer.name': ('sgd', 'adamw', 'adam'),
    'optimizer.schedule': ('poly', 'constant', 'cosine_restarts'),
    'dtype': ('float32', 'bfloat16'),
    # The modes of evaluation.metrics.MODES (core does not import evaluation).
    'eval.metric_mode': ('paper', 'standard'),
    'protocol': PROTOCOLS,
}
# (requirement, test, keys) for numeric keys; every float must also be finite.
# `model.*` keys are checked where the model config has them (the others take
# the model's defaults).
RANGES: tuple[tuple[str, Callable[[Any], bool], tuple[str, ...]], ...] = (
    ('> 0', lambda value: value > 0, (
        'batch_size', 'prefetch_to_device', 'dataset.image_size',
        'dataset.in_channels', 'log_every_steps', 'checkpoint_every_steps',
        'keep_checkpoints', 'eval.batch_size', 'optimizer.learning_rate',
        'optimizer.restart_epochs', 'model.mlp_ratio')),
    ('>= 0', lambda value: value >= 0, (
        'loss.ce_weight', 'loss.dice_weight', 'loss.scr_weight',
        'loss.ifd_weight', 'optimizer.weight_decay', 'optimizer.grad_clip_norm',
        'optimizer.poly_power', 'optimizer.min_learning_rate',
        'dataset.num_workers', 'image_summary_every_steps',
        'early_stopping_patience', 'seed')),
    ('in [0, 1)', lambda value: 0 <= value < 1, (
        'optimizer.momentum', 'model.drop_rate', 'model.attn_drop_rate',
        'model.drop_path_rate')),
)
BOOLEAN = ('loss.use_selfreg', 'dataset.augment', 'dataset.volumetric',
           'init.load_final_norm', 'eval.save_predictions')


class ConfigError(cli.UserError):
  """A config value is invalid; the message names the key."""


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def flatten(tree: ml_collections.ConfigDict | dict[str, Any]
            ) -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: every leaf of a config or nested dict by
  its dotted key.

  Sections (ConfigDicts or dicts) are walked, in their order; any other value
  is a leaf, kept as it is (a list stays a list). An empty section gives no
  key.
  """
  flat = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update({f'{key}.{inner}': leaf
                   for inner, leaf in flatten(value).items()})
    else:
      flat[f'{key}'] = value
  return flat


def validate(config: ml_collections.ConfigDict, mode: str = 'train_and_eval',
             device_count: int | None = None,
             process_count: int | None = None) -> None:
  """Raises ConfigError naming the first invalid key."""
  if mode not in MODES:
    raise ConfigError(f'--mode={mode!r}: choose one of {MODES}.')
  for key, value in flatten(config).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'config.{key}={value!r} must be a finite number.')
  for key, choices in CHOICES.items():
    if _get(config, key) not in choices:
      raise ConfigError(f'config.{key}={_get(config, key)!r}: choose one of '
                        f'{choices}.')
  for requirement, test, keys in RANGES:
    for key in keys:
      if key.startswith('model.') and key.split('.')[1] not in config.model:
        continue
      if not test(_get(config, key)):
        raise ConfigError(
            f'config.{key}={_get(config, key)!r} must be {requirement}.')
  for key in BOOLEAN:
    if not isinstance(_get(config, key), bool):
      raise ConfigError(f'config.{key}={_get(config, key)!r} must be True or '
                        'False.')
  if config.eval_every_steps < -1:
    raise ConfigError(f'config.eval_every_steps={config.eval_every_steps} '
                      'must be >= -1 (0: only at the end, -1: never).')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError('config.num_epochs or config.num_train_steps must be '
                      '> 0.')
  optimizer = config.optimizer
  if (optimizer.schedule == 'cosine_restarts'
      and optimizer.min_learning_rate > optimizer.learning_rate):
    raise ConfigError(
        f'config.optimizer.min_learning_rate={optimizer.min_learning_rate} '
        'must be <= config.optimizer.learning_rate='
        f'{optimizer.learning_rate} (the floor of each cosine cycle).')
  _validate_protocol(config)
  _validate_model(config)
  _validate_pretrained(config)
  _validate_batch(config, device_count, process_count)


def _validate_protocol(config: ml_collections.ConfigDict) -> None:
  """The evaluated checkpoint must exist under config.protocol."""
  which = str(config.eval.checkpoint)
  try:
    epoch = checkpoints.selected_epoch(which)
  except cli.UserError as e:
    raise ConfigError(f'config.eval.{e}') from e
  if epoch is None and which not in ('best', 'latest') and not which.isdigit():
    raise ConfigError(f"config.eval.checkpoint={which!r}: choose 'best', "
                      "'latest', 'epoch:N' or a step number.")
  if epoch is not None and config.num_train_steps <= 0 and (
      epoch > config.num_epochs):
    raise ConfigError(f'config.eval.checkpoint={which!r} is after the last '
                      f'epoch (config.num_epochs={config.num_epochs}).')
  if config.protocol != 'paper':
    return
  if which == 'best':
    raise ConfigError(
        "config.eval.checkpoint='best' selects by validation Dice, but "
        "config.protocol='paper' runs no validation: choose 'epoch:N', "
        "'latest' or a step, or config.protocol='validated'.")
  if config.early_stopping_patience:
    raise ConfigError(
        f'config.early_stopping_patience={config.early_stopping_patience} '
        "counts validations, which config.protocol='paper' does not run: "
        'set it to 0.')


def _validate_model(config: ml_collections.ConfigDict) -> None:
  model, dataset = config.model, config.dataset
  if model.name not in MODELS:
    raise ConfigError(f'config.model.name={model.name!r}: choose one of '
                      f'{sorted(MODELS)}.')
  if model.in_channels != dataset.in_channels:
    raise ConfigError(f'config.model.in_channels={model.in_channels} differs '
                      f'from config.dataset.in_channels={dataset.in_channels}.')
  fitting = outputs.fitting_outputs(dataset.num_classes)
  if model.num_classes not in fitting:
    raise ConfigError(
        f'config.model.num_classes={model.num_classes} does not fit '
        f'config.dataset.num_classes={dataset.num_classes} (use '
        f'{" or ".join(map(str, fitting))}; 1 is the sigmoid head of a '
        'binary set).')
  if model.name == 'unet' and dataset.image_size < unet.MIN_IMAGE_SIZE:
    raise ConfigError(
        f'config.dataset.image_size={dataset.image_size}: the UNet needs >= '
        f'{unet.MIN_IMAGE_SIZE}: its {unet.NUM_POOLS} max-pools halve the '
        'size, rounding down, and must leave at least one pixel.')
  if model.name == 'swin_unet':
    if model.image_size != dataset.image_size:
      raise ConfigError(
          f'config.model.image_size={model.image_size} differs from '
          f'config.dataset.image_size={dataset.image_size}.')
    try:
      stage_windows(model.image_size, model.patch_size, len(model.depths),
                    model.window_size)
    except ValueError as e:
      raise ConfigError(f'config.model.image_size: {e}') from e


def _validate_pretrained(config: ml_collections.ConfigDict) -> None:
  pretrained = config.init.pretrained
  if not pretrained:
    return
  if config.model.name != 'swin_unet':
    raise ConfigError(
        f'config.init.pretrained={pretrained!r}: the ImageNet Swin-T '
        f'initialisation is for the Swin-UNet, not {config.model.name!r}.')
  if not pathlib.Path(pretrained).is_file():
    raise ConfigError(f'config.init.pretrained={pretrained!r}: no such file.')


def _validate_batch(config: ml_collections.ConfigDict,
                    device_count: int | None,
                    process_count: int | None) -> None:
  device_count = device_count or jax.device_count()
  process_count = process_count or jax.process_count()
  for key in ('batch_size', 'eval.batch_size'):
    value = _get(config, key)
    if value % device_count or value % process_count:
      raise ConfigError(
          f'config.{key}={value} must be divisible by the number of devices '
          f'({device_count}) and of processes ({process_count}).')
