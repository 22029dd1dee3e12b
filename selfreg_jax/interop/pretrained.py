"""PyTorch <-> Flax variables of our models, and the ImageNet Swin-T init.

Names. Each model has one mapping function from our variable path (a tuple
such as ('params', 'layers_0', 'blocks_1', 'attn', 'qkv', 'kernel')) to the
name of the same tensor in the public PyTorch model:
  * `unet_torch_name`: Pytorch-UNet (milesial), bilinear variant;
  * `swin_torch_name`: SwinTransformerSys of the public Swin-Unet code (the
    `SwinUnet` wrapper there prefixes every name with 'swin_unet.', which is
    accepted and stripped on import).

Buffers. PyTorch also stores buffers that our models recompute or do not
need: BatchNorm `num_batches_tracked`, Swin `attn.relative_position_index`
(every block) and `attn_mask` (blocks that shift their windows). They hold no
learned value (the window and image size fix the Swin ones; the counter only
matters to a BatchNorm without momentum), so import ignores them, present or
not, without checking their values: a Swin-UNet trained at another image size
with the same windows imports as well.
`export_torch_state_dict` writes our variables only; `public_torch_state_dict`
adds every buffer with the value PyTorch computes, and the wrapper prefix, for
`load_state_dict(strict=True)` on the public model.

Layouts. Linear weights are (out, in) in PyTorch and (in, out) here; Conv2d
weights are (O, I, kh, kw) in PyTorch and (kh, kw, I, O) here; LayerNorm and
BatchNorm `weight` is our `scale`, BatchNorm `running_mean`/`running_var` are
our `batch_stats` `mean`/`var`. Everything else keeps its layout.

Coverage. `import_torch_state_dict` fills every variable of the target from
exactly one state dict entry: the mapping is checked to be one-to-one, and
entries the model lacks, variables the state dict lacks and shape mismatches
are all reported, sorted, in one error.
"""

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from flax import traverse_util
import ml_collections
import numpy as np

from selfreg_jax.core.models import create_model
from selfreg_jax.core.models import swin_unet
from selfreg_jax.interop import torch_io

VariablePath = tuple[str, ...]
StateDict = dict[str, np.ndarray]

# Our leaf names -> PyTorch parameter / buffer names.
_LEAF_NAMES = {
    'kernel': 'weight',
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
    'relative_position_bias_table': 'relative_position_bias_table',
}

# Axes taking a Flax kernel of the given rank to PyTorch layout.
_KERNEL_TO_TORCH_AXES = {
    2: (1, 0),        # Linear: (in, out) -> (out, in)
    4: (3, 2, 0, 1),  # Conv2d: (kh, kw, I, O) -> (O, I, kh, kw)
}


def _path_str(path: VariablePath) -> str:
  return '/'.join(path)


def _leaf_name(path: VariablePath) -> str:
  if path[-1] not in _LEAF_NAMES:
    raise ValueError(f'Variable {_path_str(path)}: no PyTorch name for a leaf '
                     f'called {path[-1]!r}.')
  return _LEAF_NAMES[path[-1]]


# DoubleConv's layers -> their index in Pytorch-UNet's `double_conv`
# Sequential (Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU).
_DOUBLE_CONV_INDEX = {'Conv_0': 0, 'BatchNorm_0': 1, 'Conv_1': 3,
                      'BatchNorm_1': 4}


def unet_torch_name(path: VariablePath) -> str:
  """The Pytorch-UNet name of a UNet variable.

    params/inc/Conv_0/kernel -> inc.double_conv.0.weight
    params/down1/DoubleConv_0/BatchNorm_0/scale
        -> down1.maxpool_conv.1.double_conv.1.weight
    batch_stats/up2/DoubleConv_0/BatchNorm_1/mean
        -> up2.conv.double_conv.4.running_mean
    params/outc/kernel -> outc.conv.weight

  Args:
    path: our variable path, collection first.

  Returns:
    The PyTorch state dict name.

  Raises:
    ValueError: the path is not a variable of our UNet.
  """
  collection, module, *layers = path[:-1]
  if collection not in ('params', 'batch_stats'):
    raise ValueError(f'UNet variable {_path_str(path)}: unknown collection.')
  if module == 'outc' and not layers:
    return f'outc.conv.{_leaf_name(path)}'
  if module == 'inc' and len(layers) == 1:
    prefix = 'inc'
  elif re.fullmatch(r'down\d', module) and layers[:1] == ['DoubleConv_0']:
    prefix, layers = f'{module}.maxpool_conv.1', layers[1:]
  elif re.fullmatch(r'up\d', module) and layers[:1] == ['DoubleConv_0']:
    prefix, layers = f'{module}.conv', layers[1:]
  else:
    raise ValueError(f'UNet variable {_path_str(path)}: no Pytorch-UNet name.')
  if len(layers) != 1 or layers[0] not in _DOUBLE_CONV_INDEX:
    raise ValueError(f'UNet variable {_path_str(path)}: no Pytorch-UNet name.')
  return f'{prefix}.double_conv.{_DOUBLE_CONV_INDEX[layers[0]]}.' + (
      _leaf_name(path))


# Our Swin-UNet module names -> SwinTransformerSys module names (first match).
_SWIN_MODULES = (
    (r'patch_embed_(proj|norm)', r'patch_embed.\1'),
    (r'layers_(\d+)_downsample', r'layers.\1.downsample'),  # PatchMerging
    (r'layers_up_(\d+)_upsample', r'layers_up.\1.upsample'),  # PatchExpand
    (r'layers_up_(\d+)', r'layers_up.\1'),  # 0: PatchExpand, else BasicLayer_up
    (r'layers_(\d+)', r'layers.\1'),
    (r'blocks_(\d+)', r'blocks.\1'),
    (r'concat_back_dim_(\d+)', r'concat_back_dim.\1'),
    (r'norm|norm_up|up|output|attn|qkv|proj|mlp|fc1|fc2|norm1|norm2|'
     r'reduction|expand', r'\g<0>'),
)


def swin_torch_name(path: VariablePath) -> str:
  """The SwinTransformerSys name of a Swin-UNet variable.

    params/patch_embed_proj/kernel -> patch_embed.proj.weight
    params/layers_0/blocks_1/attn/qkv/kernel
        -> layers.0.blocks.1.attn.qkv.weight
    params/layers_0_downsample/reduction/kernel
        -> layers.0.downsample.reduction.weight
    params/layers_up_0/expand/kernel -> layers_up.0.expand.weight
    params/layers_up_1_upsample/norm/scale -> layers_up.1.upsample.norm.weight
    params/concat_back_dim_1/kernel -> concat_back_dim.1.weight
    params/up/expand/kernel -> up.expand.weight  (FinalPatchExpand_X4)
    params/output/kernel -> output.weight

  Args:
    path: our variable path, collection first.

  Returns:
    The PyTorch state dict name (without the wrapper's 'swin_unet.' prefix).

  Raises:
    ValueError: the path is not a variable of our Swin-UNet.
  """
  collection, *modules = path[:-1]
  if collection != 'params' or not modules:
    raise ValueError(f'Swin-UNet variable {_path_str(path)}: not a parameter.')
  names = []
  for module in modules:
    for pattern, replacement in _SWIN_MODULES:
      if re.fullmatch(pattern, module):
        names.append(re.sub(pattern, replacement, module))
        break
    else:
      raise ValueError(f'Swin-UNet variable {_path_str(path)}: no '
                       f'SwinTransformerSys name for module {module!r}.')
  return '.'.join(names + [_leaf_name(path)])


def unet_torch_buffers(names: Sequence[str],
                       model_config: ml_collections.ConfigDict,
                       batches_tracked: int) -> StateDict:
  """Pytorch-UNet's buffers: each BatchNorm's `num_batches_tracked`.

  Args:
    names: the PyTorch names of our UNet's variables.
    model_config: unused (the names give every BatchNorm).
    batches_tracked: the count to store, an int64 scalar as in torch.
  """
  del model_config  # Unused.
  return {name.removesuffix('running_mean') + 'num_batches_tracked':
          np.array(batches_tracked, np.int64)
          for name in names if name.endswith('.running_mean')}


_SWIN_BIAS_TABLE = re.compile(
    r'(layers|layers_up)\.(\d+)\.blocks\.(\d+)\.attn\.'
    r'relative_position_bias_table')


def swin_torch_buffers(names: Sequence[str],
                       model_config: ml_collections.ConfigDict,
                       batches_tracked: int) -> StateDict:
  """SwinTransformerSys' buffers, with the values PyTorch computes.

  Every block has `attn.relative_position_index` ((N, N) int64, N = w*w for
  its window w); a block that shifts its windows (odd blocks of a stage whose
  resolution exceeds the window) also has `attn_mask` ((nW, N, N) float32, 0
  within a region and -100 across, windows in row-major order). Other blocks
  register the mask as None, which is not in the state dict.

  Args:
    names: the PyTorch names of our Swin-UNet's variables.
    model_config: `config.model` (image size, patch, window and depths give
      each stage's resolution and window).
    batches_tracked: unused (no BatchNorm).
  """
  del batches_tracked  # Unused.
  model = create_model(model_config)
  windows = swin_unet.stage_windows(model.image_size, model.patch_size,
                                    len(model.depths), model.window_size)
  last = len(model.depths) - 1
  buffers = {}
  for name in names:
    table = _SWIN_BIAS_TABLE.fullmatch(name)
    if not table:
      continue
    kind, number, index = table[1], int(table[2]), int(table[3])
    resolution, window, shift = windows[number if kind == 'layers'
                                        else last - number]
    block = name.removesuffix('attn.relative_position_bias_table')
    buffers[block + 'attn.relative_position_index'] = (
        swin_unet.relative_position_index(window).astype(np.int64))
    if shift and index % 2:
      buffers[block + 'attn_mask'] = swin_unet.shifted_window_mask(
          resolution, window, shift).reshape(-1, window ** 2, window ** 2)
  return buffers


@dataclasses.dataclass(frozen=True)
class TorchModel:
  """How one of our models is named in PyTorch.

  Attributes:
    torch_name: our variable path -> PyTorch state dict name.
    recomputed_buffers: name suffixes of PyTorch buffers our model recomputes.
    buffers: (PyTorch names of our variables, config.model, batches tracked)
      -> every buffer of the PyTorch model, named and valued as torch has it.
    wrapper_prefix: the prefix of every name in the public wrapper model's
      state dict (written on export, accepted with or without on import).
  """
  torch_name: Callable[[VariablePath], str]
  recomputed_buffers: tuple[str, ...]
  buffers: Callable[[Sequence[str], ml_collections.ConfigDict, int], StateDict]
  wrapper_prefix: str | None = None


TORCH_MODELS = {
    'unet': TorchModel(unet_torch_name, ('.num_batches_tracked',),
                       unet_torch_buffers),
    'swin_unet': TorchModel(swin_torch_name,
                            ('.attn.relative_position_index', '.attn_mask'),
                            swin_torch_buffers, wrapper_prefix='swin_unet.'),
}


def _torch_model(model_name: str) -> TorchModel:
  if model_name not in TORCH_MODELS:
    raise ValueError(f'No PyTorch mapping for model {model_name!r}; choose one '
                     f'of {sorted(TORCH_MODELS)}.')
  return TORCH_MODELS[model_name]


def _kernel_axes(path: VariablePath, ndim: int) -> tuple[int, ...] | None:
  """Axes taking our leaf to PyTorch layout; None if the layout is the same."""
  if path[-1] != 'kernel':
    return None
  if ndim not in _KERNEL_TO_TORCH_AXES:
    raise ValueError(f'Variable {_path_str(path)}: a kernel of rank {ndim} has '
                     'no PyTorch layout.')
  return _KERNEL_TO_TORCH_AXES[ndim]


def to_torch_layout(path: VariablePath, value: np.ndarray) -> np.ndarray:
  """Our leaf `value` at `path` in PyTorch layout."""
  axes = _kernel_axes(path, value.ndim)
  return value if axes is None else np.transpose(value, axes)


def from_torch_layout(path: VariablePath, value: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in the layout of our leaf at `path`."""
  axes = _kernel_axes(path, value.ndim)
  return value if axes is None else np.transpose(value, np.argsort(axes))


def _as_leaf(path: VariablePath, value: np.ndarray, dtype) -> np.ndarray:
  """A fresh C-ordered copy of a PyTorch tensor, as our leaf of `dtype`."""
  return np.array(from_torch_layout(path, value), dtype=dtype, order='C')


def torch_shape(path: VariablePath, shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch shape of our leaf of `shape` at `path`."""
  axes = _kernel_axes(path, len(shape))
  return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def torch_names(variables: Mapping[str, Any],
                model_name: str) -> dict[str, VariablePath]:
  """PyTorch name -> our variable path, for every leaf of `variables`.

  Leaves may be arrays or `jax.ShapeDtypeStruct`s.

  Raises:
    ValueError: a variable has no PyTorch name, or two share one.
  """
  torch_name = _torch_model(model_name).torch_name
  names: dict[str, VariablePath] = {}
  clashes = []
  for path in traverse_util.flatten_dict(variables):
    name = torch_name(path)
    if name in names:
      clashes.append(f'{name}: {_path_str(names[name])} and {_path_str(path)}')
    names[name] = path
  if clashes:
    raise ValueError(f'The {model_name} name mapping is not one-to-one: '
                     + '; '.join(sorted(clashes)))
  return names


def _strip_prefix(state_dict: Mapping[str, np.ndarray],
                  prefix: str | None) -> StateDict:
  """Removes `prefix` from the names that carry it."""
  stripped: StateDict = {}
  for name, value in state_dict.items():
    short = name.removeprefix(prefix) if prefix else name
    if short in stripped:
      raise ValueError(f'State dict name {short!r} occurs both with and '
                       f'without the {prefix!r} prefix.')
    stripped[short] = value
  return stripped


def _shape_mismatch(name: str, source: np.ndarray,
                    expected: tuple[int, ...]) -> str | None:
  if tuple(source.shape) == expected:
    return None
  return (f'{name}: checkpoint {tuple(source.shape)} vs model {expected} '
          '(PyTorch layout)')


def _problems_message(title: str, sections: Mapping[str, Sequence[str]]) -> str:
  """A multi-line error: the title, then each non-empty section sorted."""
  lines = [title]
  for heading, items in sections.items():
    if items:
      lines.append(f'{heading} ({len(items)}):')
      lines.extend(f'  {item}' for item in sorted(items))
  return '\n'.join(lines)


def import_torch_state_dict(state_dict: Mapping[str, np.ndarray],
                            variables: Mapping[str, Any],
                            model_name: str) -> dict[str, Any]:
  """Fills every variable of a model from a trained PyTorch state dict.

  Args:
    state_dict: flat PyTorch name -> array (see `torch_io.state_dict_of`).
      Swin-UNet names may carry the public wrapper's 'swin_unet.' prefix.
      Recomputed buffers (see module docstring) are ignored.
    variables: the target variables, e.g. from `jax.eval_shape(model.init,
      ...)`; only their structure, shapes and dtypes are used.
    model_name: 'unet' or 'swin_unet' (`config.model.name`).

  Returns:
    Variables of the same structure with NumPy leaves in our layout and in
    each target leaf's dtype; BatchNorm running statistics in 'batch_stats'.

  Raises:
    ValueError: listing, sorted, every variable the state dict lacks, every
      state dict entry the model lacks and every shape mismatch.
  """
  torch_model = _torch_model(model_name)
  source = _strip_prefix(state_dict, torch_model.wrapper_prefix)
  flat = traverse_util.flatten_dict(variables)
  names = torch_names(variables, model_name)
  missing = [name for name in names if name not in source]
  unexpected = [name for name in source if name not in names
                and not name.endswith(torch_model.recomputed_buffers)]
  mismatched, imported = [], {}
  for name, path in names.items():
    if name not in source:
      continue
    expected = torch_shape(path, flat[path].shape)
    problem = _shape_mismatch(name, source[name], expected)
    if problem:
      mismatched.append(problem)
      continue
    imported[path] = _as_leaf(path, source[name], flat[path].dtype)
  if missing or unexpected or mismatched:
    raise ValueError(_problems_message(
        f'Cannot import the PyTorch state dict into the {model_name} model:',
        {'missing from the state dict': missing,
         'not in the model': unexpected,
         'shape mismatch': mismatched}))
  return traverse_util.unflatten_dict(imported)


def export_torch_state_dict(variables: Mapping[str, Any],
                            model_name: str) -> StateDict:
  """All variables under their PyTorch names, in PyTorch layout.

  Only our variables: no buffers (see module docstring) and Swin-UNet names
  as in SwinTransformerSys (no 'swin_unet.' prefix), so the result loads into
  PyTorch with `strict=False`; `public_torch_state_dict` is the strict one.
  """
  flat = traverse_util.flatten_dict(variables)
  return {name: np.ascontiguousarray(to_torch_layout(path,
                                                     np.asarray(flat[path])))
          for name, path in sorted(torch_names(variables, model_name).items())}


def public_torch_state_dict(variables: Mapping[str, Any],
                            model_config: ml_collections.ConfigDict,
                            batches_tracked: int = 0) -> StateDict:
  """The state dict of the public PyTorch model, buffers included.

  What `load_state_dict(strict=True)` needs on Pytorch-UNet's `UNet` or on the
  Swin-Unet wrapper `SwinUnet` (whose `swin_unet` is the SwinTransformerSys):
  `export_torch_state_dict`, plus every buffer with the value torch computes
  (see `unet_torch_buffers`, `swin_torch_buffers`), with the wrapper prefix.

  Args:
    variables: the model's variables (arrays).
    model_config: `config.model` of those variables.
    batches_tracked: each BatchNorm's `num_batches_tracked`; a run's training
      step counts them (every step updates every BatchNorm once).
  """
  torch_model = _torch_model(model_config.name)
  state_dict = export_torch_state_dict(variables, model_config.name)
  state_dict.update(torch_model.buffers(list(state_dict), model_config,
                                        batches_tracked))
  prefix = torch_model.wrapper_prefix or ''
  return {prefix + name: value for name, value in sorted(state_dict.items())}


@dataclasses.dataclass(frozen=True)
class PretrainedReport:
  """What an ImageNet initialisation did, every entry sorted by name.

  Attributes:
    loaded: (PyTorch name, our variable path) copied directly.
    mirrored: (encoder PyTorch name, our decoder variable path) copied into the
      mirrored decoder stage.
    dropped: (PyTorch name, reason) not used.
    random_init: our variable paths left as they were.
  """
  loaded: tuple[tuple[str, str], ...]
  mirrored: tuple[tuple[str, str], ...]
  dropped: tuple[tuple[str, str], ...]
  random_init: tuple[str, ...]


_SWIN_BLOCK = re.compile(r'layers\.(\d+)\.blocks\.(\d+)\.(.+)')
IMAGENET_FINAL_NORM_REASON = (
    'final norm, not loaded: config.init.load_final_norm=False (the public '
    'load_from loads it into the bottleneck norm)')


def _imagenet_destinations(name: str, depths: Sequence[int],
                           load_final_norm: bool
                           ) -> tuple[list[tuple[str, bool]], str | None]:
  """Where one ImageNet Swin entry goes (docs/design.md section 6).

  Returns:
    ([(target PyTorch-style name, is_mirror), ...], None) for an entry to load,
    or ([], reason) for one to drop.
  """
  if name.endswith(TORCH_MODELS['swin_unet'].recomputed_buffers):
    return [], 'buffer recomputed by the model'
  if name.startswith('head.'):
    return [], 'ImageNet classification head'
  if name.startswith('norm.') and not load_final_norm:
    return [], IMAGENET_FINAL_NORM_REASON
  block = _SWIN_BLOCK.fullmatch(name)
  if not block:
    return [(name, False)], None
  stage, index, rest = int(block[1]), int(block[2]), block[3]
  if stage >= len(depths):  # No such stage: reported as not in the model.
    return [(name, False)], None
  if index >= depths[stage]:
    return [], f'past the depth {depths[stage]} of stage {stage} here'
  destinations = [(name, False)]
  decoder_stage = len(depths) - 1 - stage
  if decoder_stage > 0:  # Decoder stage 0 is a PatchExpand: no blocks.
    destinations.append(
        (f'layers_up.{decoder_stage}.blocks.{index}.{rest}', True))
  return destinations, None


def _read_state_dict(source: str | os.PathLike | Mapping[str, np.ndarray]
                     ) -> tuple[StateDict, str]:
  """(state dict, description for messages) of a path or a state dict."""
  if isinstance(source, Mapping):
    return dict(source), 'the given state dict'
  return torch_io.state_dict_of(torch_io.load_checkpoint(source)), str(source)


def load_swin_imagenet(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    variables: Mapping[str, Any],
    model_config: ml_collections.ConfigDict,
    *,
    load_final_norm: bool = True,
) -> tuple[dict[str, Any], PretrainedReport]:
  """Initialises a Swin-UNet from an ImageNet Swin checkpoint.

  Following docs/design.md section 6: the patch embedding and the encoder stages
  (blocks and PatchMerging) load directly; the final encoder `norm` loads into
  our bottleneck `norm` (same name and shape) unless `load_final_norm` is
  False; blocks past this model's depth and the classification head are
  dropped; every encoder stage i's blocks are also copied into decoder stage
  (stages - 1 - i), i.e. `layers_up.{3-i}` (decoder stage 0 is a PatchExpand
  and gets nothing); everything else keeps its value in `variables`.

  Args:
    source: `swin_tiny_patch4_window7_224.pth` (a dict with key 'model') or an
      already loaded flat state dict.
    variables: the initialised Swin-UNet variables.
    model_config: `config.model` of the Swin-UNet (gives the stage depths).
    load_final_norm: load the ImageNet final `norm` into our bottleneck norm,
      as the public Swin-Unet load_from does (`config.init.load_final_norm`);
      False drops it and keeps the bottleneck norm as it is in `variables`.

  Returns:
    (variables with the loaded leaves replaced by NumPy arrays, report). The
    report is also logged.

  Raises:
    ValueError: an entry to load has no variable in the model or the wrong
      shape (all such entries are listed, sorted), or nothing loads.
  """
  if model_config.get('name') != 'swin_unet':
    raise ValueError('ImageNet Swin initialisation needs config.model.name='
                     f"'swin_unet', got {model_config.get('name')!r}.")
  depths = tuple(create_model(model_config).depths)
  state_dict, description = _read_state_dict(source)
  state_dict = _strip_prefix(state_dict,
                             TORCH_MODELS['swin_unet'].wrapper_prefix)
  flat = traverse_util.flatten_dict(variables)
  names = torch_names(variables, 'swin_unet')
  loaded, mirrored, dropped, not_in_model, mismatched = [], [], [], [], []
  written = dict(flat)
  for name in sorted(state_dict):
    destinations, reason = _imagenet_destinations(name, depths,
                                                  load_final_norm)
    if reason:
      dropped.append((name, reason))
    for target, is_mirror in destinations:
      if target not in names:
        not_in_model.append(name if target == name else f'{name} -> {target}')
        continue
      path = names[target]
      problem = _shape_mismatch(name, state_dict[name],
                                torch_shape(path, flat[path].shape))
      if problem:
        mismatched.append(f'{problem} for {target}')
        continue
      written[path] = _as_leaf(path, state_dict[name], flat[path].dtype)
      (mirrored if is_mirror else loaded).append((name, _path_str(path)))
  if not_in_model or mismatched:
    raise ValueError(_problems_message(
        f'{description}: cannot initialise the Swin-UNet from it:',
        {'not in the model': not_in_model, 'shape mismatch': mismatched}))
  if not loaded:
    raise ValueError(f'{description}: no entry to load: not a Swin '
                     'checkpoint?')
  touched = {path for _, path in loaded + mirrored}
  report = PretrainedReport(
      loaded=tuple(loaded), mirrored=tuple(mirrored), dropped=tuple(dropped),
      random_init=tuple(sorted(_path_str(path) for path in flat
                               if _path_str(path) not in touched)))
  logging.info('ImageNet Swin init from %s:\n%s', description,
               format_report(report))
  return traverse_util.unflatten_dict(written), report


def _table(rows: Sequence[tuple[str, str]], separator: str) -> list[str]:
  width = max((len(left) for left, _ in rows), default=0)
  return [f'  {left:<{width}}{separator}{right}' for left, right in rows]


def format_report(report: PretrainedReport) -> str:
  """A readable table of a `PretrainedReport`."""
  lines = [f'{len(report.loaded)} loaded, {len(report.mirrored)} mirrored into '
           f'the decoder, {len(report.dropped)} dropped, '
           f'{len(report.random_init)} left at random init.']
  lines.append('loaded (PyTorch name -> our variable):')
  lines += _table(report.loaded, ' -> ')
  lines.append('mirrored (encoder PyTorch name -> our decoder variable):')
  lines += _table(report.mirrored, ' -> ')
  lines.append('dropped (PyTorch name: reason):')
  lines += _table(report.dropped, ' : ')
  lines.append('left at random init (our variable):')
  lines += [f'  {path}' for path in report.random_init]
  return '\n'.join(lines)
