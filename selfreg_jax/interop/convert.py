"""Converts model checkpoints between PyTorch and our orbax runs.

PyTorch -> orbax (a checkpoint that `--mode eval` accepts):

  python -m selfreg_jax.interop.convert --from-torch CKPT.pth --config configs/X.py \
      --out DIR [--config.model.num_classes=9 ...]

CKPT may be a torch.save file (.pth/.pt/.bin, read without torch), a
.safetensors or a .npz file holding a trained Pytorch-UNet or Swin-Unet state
dict; every variable of `config.model` must be filled by exactly one entry.

Buffers that torch stores but our models recompute (relative_position_index,
attn_mask, num_batches_tracked) are ignored, present or not, and Swin-UNet
names may carry the SwinUnet wrapper's 'swin_unet.' prefix or not.

orbax -> safetensors with PyTorch names and layouts:

  python -m selfreg_jax.interop.convert --to-safetensors OUT.safetensors --workdir RUN \
      [--checkpoint latest] [--config configs/X.py] [--nostrict]

By default the file is the public model's full state dict, which
`SwinUnet(...).load_state_dict(..., strict=True)` (Swin-Unet) or
`UNet(...).load_state_dict(..., strict=True)` (Pytorch-UNet) accepts: names
with the 'swin_unet.' wrapper prefix, and every buffer with the value torch
computes; each BatchNorm's num_batches_tracked is the checkpoint's step (one
BatchNorm update per training step; 0 for a checkpoint imported from torch).
`--nostrict` writes only our variables, under SwinTransformerSys /
Pytorch-UNet names (for `strict=False` loading).

The model comes from `--config` when given, else from the config stored with
the run's checkpoint.
"""

from collections.abc import Sequence
import pathlib
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from selfreg_jax.common import cli
from selfreg_jax.common import runtime
from selfreg_jax.core import checkpoints
from selfreg_jax.core import models
from selfreg_jax.interop import pretrained
from selfreg_jax.interop import torch_io

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file whose `model` field describes the model.')
_FROM_TORCH = flags.DEFINE_string(
    'from-torch', None, 'PyTorch checkpoint (.pth/.pt/.bin/.safetensors/.npz) '
    'to convert into an orbax checkpoint in --out.')
_OUT = flags.DEFINE_string('out', None, 'Run directory to write the converted '
                           'checkpoint into (as step 0).')
_TO_SAFETENSORS = flags.DEFINE_string(
    'to-safetensors', None, 'Export the model variables of --workdir to this '
    '.safetensors file with PyTorch names and layouts.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory to export.')
_STRICT = flags.DEFINE_boolean(
    'strict', True, "Export the public PyTorch model's full state dict (the "
    "'swin_unet.' wrapper prefix and every buffer torch registers), for "
    'load_state_dict(strict=True); --nostrict: only our variables.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', 'latest', "Checkpoint of --workdir to export: 'latest', "
    "'best' or a step number.")

# Spatial size used only to trace the UNet's init (its variables do not
# depend on it); the Swin-UNet uses its configured image size.
_UNET_TRACE_SIZE = 32


def abstract_variables(model_config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of the model's variables, without computing them.

  A conversion's config describes only the model (no data set, no training),
  so it needs the model part of a run context alone.
  """
  model = models.create_model(model_config)
  return models.abstract_variables(
      model, getattr(model, 'image_size', _UNET_TRACE_SIZE))


def torch_to_orbax(checkpoint_path: str | pathlib.Path, out: str | pathlib.Path,
                   config: ml_collections.ConfigDict) -> Any:
  """Imports a trained PyTorch checkpoint and saves it as a run's step 0.

  Returns:
    The imported variables.
  """
  checkpoint = torch_io.load_checkpoint(checkpoint_path)
  try:
    variables = pretrained.import_torch_state_dict(
        torch_io.state_dict_of(checkpoint), abstract_variables(config.model),
        config.model.name)
  except ValueError as e:
    raise cli.UserError(f'{checkpoint_path}: {e}') from None
  checkpoints.write_variables(out, variables, config)
  logging.info('Imported %d PyTorch tensors from %s into %s.',
               len(jax.tree.leaves(variables)), checkpoint_path, out)
  return variables


def orbax_to_safetensors(workdir: str | pathlib.Path,
                         out: str | pathlib.Path,
                         config: ml_collections.ConfigDict | None = None,
                         which: str = 'latest',
                         strict: bool = True) -> dict[str, Any]:
  """Exports a run's model variables with PyTorch names; returns them.

  With `strict`, the public PyTorch model's full state dict
  (`pretrained.public_torch_state_dict`, num_batches_tracked = the step);
  else only our variables (`pretrained.export_torch_state_dict`).
  """
  if config is None:
    config = checkpoints.stored_config(workdir, which)
    if config is None:
      raise FileNotFoundError(f'{workdir}: checkpoint {which!r} holds no '
                              'config: pass --config.')
  variables, step = checkpoints.restore_variables(
      workdir, abstract_variables(config.model), which)
  if strict:
    state_dict = pretrained.public_torch_state_dict(variables, config.model,
                                                    batches_tracked=step)
  else:
    state_dict = pretrained.export_torch_state_dict(variables,
                                                    config.model.name)
  torch_io.save_safetensors(state_dict, out)
  logging.info('Exported %d tensors of %s step %d to %s.', len(state_dict),
               workdir, step, out)
  return state_dict


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(_FROM_TORCH.value) == bool(_TO_SAFETENSORS.value):
    raise app.UsageError('Give exactly one of --from-torch and '
                         '--to-safetensors.')
  if _FROM_TORCH.value:
    if not _OUT.value or _CONFIG.value is None:
      raise app.UsageError('--from-torch needs --config and --out.')
    torch_to_orbax(_FROM_TORCH.value, _OUT.value, _CONFIG.value)
  else:
    if not _WORKDIR.value:
      raise app.UsageError('--to-safetensors needs --workdir.')
    orbax_to_safetensors(_WORKDIR.value, _TO_SAFETENSORS.value, _CONFIG.value,
                         _CHECKPOINT.value, _STRICT.value)


if __name__ == '__main__':
  runtime.prepare_process()
  cli.run_app(main)
