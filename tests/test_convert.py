"""The convert CLI: PyTorch checkpoint -> orbax run -> safetensors.

The PyTorch files are torch.save archives written without torch (see
test_torch_io) holding state dicts laid out like the public models' (buffers
and the Swin-Unet wrapper's 'swin_unet.' prefix included, or left out).
"""

import os
from pathlib import Path
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import tiny_configs as tc
from selfreg_jax.core import checkpoints
from selfreg_jax.interop import convert
from selfreg_jax.interop import pretrained
from selfreg_jax.interop import torch_io
from test_pretrained import (abstract, assert_trees_equal, learnable,
                             random_state_dict, random_variables,
                             reference_shapes)
from test_torch_io import _contiguous, _write_torch_zip

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 120
# How the public code's checkpoints name things: DataParallel's 'module.' for
# the UNet, the SwinUnet wrapper's 'swin_unet.' for the Swin-UNet.
SAVED_PREFIX = {'unet': 'module.', 'swin_unet': 'swin_unet.'}
TRAINED_STEPS = 7  # Step of a run to export: every BatchNorm updated 7 times.


def _config_file(tmp_path, model_config):
  path = tmp_path / 'config.py'
  path.write_text('import ml_collections\n\n\ndef get_config():\n'
                  f'  return ml_collections.ConfigDict({{"model": '
                  f'{model_config.to_dict()!r}}})\n')
  return path


def _torch_file(path, state_dict, prefix=''):
  return _write_torch_zip(path, {
      prefix + name: _contiguous(value, str(i))
      for i, (name, value) in enumerate(state_dict.items())})


def _cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'selfreg_jax.interop.convert', *map(str, args)],
      cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.tiny_swin])
def test_cli_converts_a_pytorch_checkpoint_and_exports_it_back(tmp_path,
                                                               config_fn):
  config = config_fn()
  source = random_state_dict(reference_shapes(config))
  checkpoint = _torch_file(tmp_path / 'trained.pth', source,
                           SAVED_PREFIX[config.name])
  run = tmp_path / 'run'
  result = _cli('--from-torch', checkpoint,
                '--config', _config_file(tmp_path, config), '--out', run)
  assert result.returncode == 0, result.stderr

  restored, step = checkpoints.restore_variables(run, abstract(config_fn))
  assert step == 0
  assert_trees_equal(restored, pretrained.import_torch_state_dict(
      source, abstract(config_fn), config.name))

  # By default: the public model's full state dict (load_state_dict with
  # strict=True), buffers and the wrapper prefix included.
  exported = tmp_path / 'exported.safetensors'
  result = _cli('--to-safetensors', exported, '--workdir', run)
  assert result.returncode == 0, result.stderr
  state_dict = torch_io.load_checkpoint(exported)
  prefix = 'swin_unet.' if config.name == 'swin_unet' else ''
  assert {name: (value.shape, value.dtype)
          for name, value in state_dict.items()} == {
              prefix + name: (shape, np.dtype(dtype))
              for name, (shape, dtype) in reference_shapes(config).items()}
  for name in learnable(reference_shapes(config)):
    np.testing.assert_array_equal(state_dict[prefix + name], source[name])
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      assert value == step, name  # The BatchNorm updates of `step` steps.

  bare = tmp_path / 'bare.safetensors'
  result = _cli('--to-safetensors', bare, '--workdir', run, '--nostrict')
  assert result.returncode == 0, result.stderr
  state_dict = torch_io.load_checkpoint(bare)
  assert state_dict.keys() == learnable(reference_shapes(config)).keys()
  for name, value in state_dict.items():
    np.testing.assert_array_equal(value, source[name])


def test_export_stores_the_step_as_num_batches_tracked(tmp_path):
  config = tc.tiny_unet()
  run = tmp_path / 'run'
  checkpoints.write_variables(run, random_variables(abstract(tc.tiny_unet)),
                              ml_collections.ConfigDict({'model': config}),
                              step=TRAINED_STEPS)
  out = tmp_path / 'unet.safetensors'
  convert.orbax_to_safetensors(run, out)
  tracked = {name: value
             for name, value in torch_io.load_checkpoint(out).items()
             if name.endswith('.num_batches_tracked')}
  assert tracked.keys() == {name for name in reference_shapes(config)
                            if name.endswith('.num_batches_tracked')}
  for name, value in tracked.items():
    assert value.shape == () and value.dtype == np.int64, name
    assert value == TRAINED_STEPS, name


def test_cli_config_overrides_apply_and_mismatches_fail_clearly(tmp_path):
  config = tc.tiny_unet()
  checkpoint = _torch_file(tmp_path / 'trained.pth',
                           random_state_dict(reference_shapes(config)))
  run = tmp_path / 'run'
  result = _cli('--from-torch', checkpoint,
                '--config', _config_file(tmp_path, config), '--out', run,
                f'--config.model.num_classes={config.num_classes + 1}')
  assert result.returncode != 0
  assert str(checkpoint) in result.stderr
  assert 'outc.conv.weight: checkpoint' in result.stderr
  assert 'outc.conv.bias: checkpoint' in result.stderr
  assert not (run / checkpoints.CHECKPOINT_DIR).exists()


def test_cli_needs_exactly_one_direction(tmp_path):
  result = _cli('--out', tmp_path / 'run')
  assert result.returncode != 0
  assert 'exactly one of --from-torch and --to-safetensors' in result.stderr


def test_import_names_every_missing_entry_and_the_file(tmp_path):
  config = tc.tiny_swin()
  shapes = reference_shapes(config)
  source = random_state_dict(shapes)
  dropped = sorted(learnable(shapes))[-2:]
  for name in dropped:
    del source[name]
  checkpoint = _torch_file(tmp_path / 'partial.pth', source)
  run = tmp_path / 'run'
  with pytest.raises(ValueError) as error:
    convert.torch_to_orbax(checkpoint, run,
                           ml_collections.ConfigDict({'model': config}))
  message = str(error.value)
  assert message.startswith(str(checkpoint))
  assert 'missing from the state dict (2):\n  ' + '\n  '.join(dropped) in (
      message)
  assert not (run / checkpoints.CHECKPOINT_DIR).exists()
