"""PyTorch name/layout mapping, import/export and the ImageNet Swin-T init.

The expected PyTorch layouts are written out below from the module
definitions of the public code (Pytorch-UNet's DoubleConv/Down/Up/OutConv and
Swin-Unet's SwinTransformerSys, whose encoder is Microsoft's SwinTransformer),
so the mapping is checked against those names and shapes, not against itself.
"""

import dataclasses
import functools
import logging
import re

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np
import pytest

import tiny_configs as tc
from selfreg_jax.core.models import create_model
from selfreg_jax.interop import pretrained
from selfreg_jax.interop.convert import abstract_variables
from test_torch_io import _contiguous, _write_torch_zip

SEED = 0
CHANNELS = 3   # Swin input channels after repeating a 1-channel image.
CLASSES = 1000  # ImageNet head.
KERNEL = 3     # Conv size of the layout semantics check.
SPATIAL = 5    # Spatial size of the layout semantics check.


@dataclasses.dataclass(frozen=True)
class SwinSpec:
  """Hyper-parameters of a SwinTransformer / SwinTransformerSys."""
  image_size: int
  patch_size: int
  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int
  mlp_ratio: int = 4

  @classmethod
  def of(cls, model_config, **changes):
    model = create_model(model_config)
    spec = cls(model.image_size, model.patch_size, model.embed_dim,
               tuple(model.depths), tuple(model.num_heads), model.window_size,
               int(model.mlp_ratio))
    return dataclasses.replace(spec, **changes)


# Microsoft's swin_tiny_patch4_window7_224.pth.
SWIN_T_IMAGENET = SwinSpec(image_size=224, patch_size=4, embed_dim=96,
                           depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                           window_size=7)

# --- Reference PyTorch layouts: name -> (shape, dtype). -----------------------


def _norm(prefix, dim):
  return {f'{prefix}.weight': ((dim,), np.float32),
          f'{prefix}.bias': ((dim,), np.float32)}


def _linear(prefix, dim_in, dim_out, bias=True):
  shapes = {f'{prefix}.weight': ((dim_out, dim_in), np.float32)}
  if bias:
    shapes[f'{prefix}.bias'] = ((dim_out,), np.float32)
  return shapes


def swin_stage_shapes(prefix, spec, stage):
  """The blocks of one BasicLayer, buffers included."""
  dim, heads = spec.embed_dim * 2 ** stage, spec.num_heads[stage]
  resolution = spec.image_size // spec.patch_size // 2 ** stage
  window = min(spec.window_size, resolution)
  tokens = window * window
  shapes = {}
  for j in range(spec.depths[stage]):
    block = f'{prefix}.blocks.{j}'
    shapes.update(_norm(f'{block}.norm1', dim))
    shapes[f'{block}.attn.relative_position_bias_table'] = (
        ((2 * window - 1) ** 2, heads), np.float32)
    shapes[f'{block}.attn.relative_position_index'] = (
        (tokens, tokens), np.int64)
    shapes.update(_linear(f'{block}.attn.qkv', dim, 3 * dim))
    shapes.update(_linear(f'{block}.attn.proj', dim, dim))
    shapes.update(_norm(f'{block}.norm2', dim))
    shapes.update(_linear(f'{block}.mlp.fc1', dim, spec.mlp_ratio * dim))
    shapes.update(_linear(f'{block}.mlp.fc2', spec.mlp_ratio * dim, dim))
    if j % 2 and resolution > spec.window_size:
      shapes[f'{block}.attn_mask'] = (
          ((resolution // window) ** 2, tokens, tokens), np.float32)
  return shapes


def swin_encoder_shapes(spec):
  """patch_embed, layers.* (with PatchMerging) and the final norm."""
  shapes = {'patch_embed.proj.weight': (
      (spec.embed_dim, CHANNELS, spec.patch_size, spec.patch_size),
      np.float32)}
  shapes['patch_embed.proj.bias'] = ((spec.embed_dim,), np.float32)
  shapes.update(_norm('patch_embed.norm', spec.embed_dim))
  last = len(spec.depths) - 1
  for i in range(len(spec.depths)):
    shapes.update(swin_stage_shapes(f'layers.{i}', spec, i))
    if i < last:
      dim = spec.embed_dim * 2 ** i
      shapes.update(_norm(f'layers.{i}.downsample.norm', 4 * dim))
      shapes.update(_linear(f'layers.{i}.downsample.reduction', 4 * dim,
                            2 * dim, bias=False))
  shapes.update(_norm('norm', spec.embed_dim * 2 ** last))
  return shapes


def swin_imagenet_shapes(spec):
  """A SwinTransformer classifier checkpoint's state dict."""
  shapes = swin_encoder_shapes(spec)
  shapes.update(_linear('head', spec.embed_dim * 2 ** (len(spec.depths) - 1),
                        CLASSES))
  return shapes


def swin_unet_shapes(spec, num_classes):
  """SwinTransformerSys' state dict (final_upsample='expand_first')."""
  shapes = swin_encoder_shapes(spec)
  last = len(spec.depths) - 1
  bottleneck = spec.embed_dim * 2 ** last
  shapes.update(_linear('layers_up.0.expand', bottleneck, 2 * bottleneck,
                        bias=False))
  shapes.update(_norm('layers_up.0.norm', bottleneck // 2))
  for i in range(1, last + 1):
    stage = last - i
    dim = spec.embed_dim * 2 ** stage
    shapes.update(_linear(f'concat_back_dim.{i}', 2 * dim, dim))
    shapes.update(swin_stage_shapes(f'layers_up.{i}', spec, stage))
    if i < last:
      shapes.update(_linear(f'layers_up.{i}.upsample.expand', dim, 2 * dim,
                            bias=False))
      shapes.update(_norm(f'layers_up.{i}.upsample.norm', dim // 2))
  shapes.update(_norm('norm_up', spec.embed_dim))
  # FinalPatchExpand_X4: x4 = x patch_size (the public code only has 4).
  shapes.update(_linear('up.expand', spec.embed_dim,
                        spec.patch_size ** 2 * spec.embed_dim, bias=False))
  shapes.update(_norm('up.norm', spec.embed_dim))
  shapes['output.weight'] = ((num_classes, spec.embed_dim, 1, 1), np.float32)
  return shapes


def _double_conv(prefix, dim_in, dim_out, dim_mid=None):
  dim_mid = dim_mid or dim_out
  shapes = {}
  for conv, norm, cin, cout in ((0, 1, dim_in, dim_mid),
                                (3, 4, dim_mid, dim_out)):
    shapes[f'{prefix}.double_conv.{conv}.weight'] = ((cout, cin, 3, 3),
                                                     np.float32)
    for stat in ('weight', 'bias', 'running_mean', 'running_var'):
      shapes[f'{prefix}.double_conv.{norm}.{stat}'] = ((cout,), np.float32)
    shapes[f'{prefix}.double_conv.{norm}.num_batches_tracked'] = ((),
                                                                  np.int64)
  return shapes


def pytorch_unet_shapes(model_config):
  """Pytorch-UNet's state dict (bilinear, bias-free DoubleConv convs)."""
  model = create_model(model_config)
  w = model.widths
  shapes = _double_conv('inc', model.in_channels, w[0])
  for k, (cin, cout) in enumerate(((w[0], w[1]), (w[1], w[2]), (w[2], w[3]),
                                   (w[3], w[4] // 2)), start=1):
    shapes.update(_double_conv(f'down{k}.maxpool_conv.1', cin, cout))
  for k, (cin, cout) in enumerate(((w[4], w[3] // 2), (w[3], w[2] // 2),
                                   (w[2], w[1] // 2), (w[1], w[0])), start=1):
    shapes.update(_double_conv(f'up{k}.conv', cin, cout, cin // 2))
  shapes['outc.conv.weight'] = ((model.num_classes, w[0], 1, 1), np.float32)
  shapes['outc.conv.bias'] = ((model.num_classes,), np.float32)
  return shapes


# --- Helpers. ----------------------------------------------------------------

RECOMPUTED = re.compile(r'.*(num_batches_tracked|relative_position_index|'
                        r'attn_mask)$')


def learnable(shapes):
  """The entries our models hold (PyTorch buffers they recompute removed)."""
  return {name: shape for name, (shape, _) in shapes.items()
          if not RECOMPUTED.match(name)}


def random_state_dict(shapes, seed=SEED):
  rng = np.random.default_rng(seed)
  return {name: (rng.standard_normal(shape, dtype=np.float32)
                 if dtype == np.float32
                 else rng.integers(0, 100, shape).astype(dtype))
          for name, (shape, dtype) in shapes.items()}


def random_variables(abstract_tree, seed=SEED):
  """NumPy leaves for an abstract variable tree, scaled like trained weights.

  Kernels ~ N(0, 1/fan_in), norm scales and running variances in [0.5, 1.5],
  everything else ~ N(0, 0.1^2): finite, non-trivial model outputs.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, struct):
    if path[-1] == 'kernel':
      fan_in = int(np.prod(struct.shape[:-1]))
      value = rng.standard_normal(struct.shape) / np.sqrt(fan_in)
    elif path[-1] in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, struct.shape)
    else:
      value = 0.1 * rng.standard_normal(struct.shape)
    return value.astype(struct.dtype)

  return traverse_util.unflatten_dict(
      {path: leaf(path, struct) for path, struct in
       traverse_util.flatten_dict(abstract_tree).items()})


def flat(variables):
  """{'params/a/kernel': NumPy leaf}."""
  return {'/'.join(path): np.asarray(leaf)
          for path, leaf in traverse_util.flatten_dict(variables).items()}


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def to_flax_layout(name, value):
  """A PyTorch Linear (out, in) / Conv2d (O, I, kh, kw) weight, Flax layout."""
  if not name.endswith('.weight'):
    return value
  return {2: lambda v: v.T, 4: lambda v: v.transpose(2, 3, 1, 0)}.get(
      value.ndim, lambda v: v)(value)


def reference_shapes(model_config):
  if model_config.name == 'unet':
    return pytorch_unet_shapes(model_config)
  return swin_unet_shapes(SwinSpec.of(model_config), model_config.num_classes)


@functools.cache
def abstract(config_fn):
  return abstract_variables(config_fn())


def _model_and_inputs(config_fn):
  """A tiny model, random variables (no slow init) and a batch of images."""
  config = config_fn()
  model = create_model(config)
  size = config.get('image_size', tc.IMAGE_SIZES[0])
  images = jax.random.normal(jax.random.key(SEED),
                             (tc.BATCH, size, size, config.in_channels))
  return model, random_variables(abstract(config_fn)), images


# --- Names and layouts. ------------------------------------------------------

NAME_EXAMPLES = [
    ('unet', 'params/inc/Conv_0/kernel', 'inc.double_conv.0.weight'),
    ('unet', 'params/inc/BatchNorm_0/scale', 'inc.double_conv.1.weight'),
    ('unet', 'batch_stats/inc/BatchNorm_1/var',
     'inc.double_conv.4.running_var'),
    ('unet', 'params/down3/DoubleConv_0/Conv_1/kernel',
     'down3.maxpool_conv.1.double_conv.3.weight'),
    ('unet', 'batch_stats/up4/DoubleConv_0/BatchNorm_0/mean',
     'up4.conv.double_conv.1.running_mean'),
    ('unet', 'params/outc/kernel', 'outc.conv.weight'),
    ('unet', 'params/outc/bias', 'outc.conv.bias'),
    ('swin_unet', 'params/patch_embed_proj/kernel', 'patch_embed.proj.weight'),
    ('swin_unet', 'params/patch_embed_norm/scale', 'patch_embed.norm.weight'),
    ('swin_unet', 'params/layers_2/blocks_1/attn/relative_position_bias_table',
     'layers.2.blocks.1.attn.relative_position_bias_table'),
    ('swin_unet', 'params/layers_0/blocks_1/mlp/fc2/bias',
     'layers.0.blocks.1.mlp.fc2.bias'),
    ('swin_unet', 'params/layers_3/blocks_0/norm1/scale',
     'layers.3.blocks.0.norm1.weight'),
    ('swin_unet', 'params/layers_1_downsample/reduction/kernel',
     'layers.1.downsample.reduction.weight'),
    ('swin_unet', 'params/layers_2_downsample/norm/bias',
     'layers.2.downsample.norm.bias'),
    ('swin_unet', 'params/norm/scale', 'norm.weight'),
    ('swin_unet', 'params/layers_up_0/expand/kernel',
     'layers_up.0.expand.weight'),
    ('swin_unet', 'params/layers_up_0/norm/bias', 'layers_up.0.norm.bias'),
    ('swin_unet', 'params/concat_back_dim_3/kernel',
     'concat_back_dim.3.weight'),
    ('swin_unet', 'params/layers_up_2/blocks_0/attn/qkv/kernel',
     'layers_up.2.blocks.0.attn.qkv.weight'),
    ('swin_unet', 'params/layers_up_1_upsample/norm/scale',
     'layers_up.1.upsample.norm.weight'),
    ('swin_unet', 'params/norm_up/scale', 'norm_up.weight'),
    ('swin_unet', 'params/up/expand/kernel', 'up.expand.weight'),
    ('swin_unet', 'params/up/norm/bias', 'up.norm.bias'),
    ('swin_unet', 'params/output/kernel', 'output.weight'),
]
TINY = {'unet': tc.tiny_unet, 'swin_unet': tc.tiny_swin}


@pytest.mark.parametrize('model_name, path, torch_name', NAME_EXAMPLES)
def test_variable_names_are_the_pytorch_names(model_name, path, torch_name):
  names = pretrained.torch_names(abstract(TINY[model_name]), model_name)
  assert '/'.join(names[torch_name]) == path


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.full_unet,
                                       tc.tiny_swin, tc.full_swin])
def test_every_variable_maps_onto_the_pytorch_layout(config_fn):
  config = config_fn()
  variables = abstract(config_fn)
  flat = traverse_util.flatten_dict(variables)
  shapes = {name: pretrained.torch_shape(path, flat[path].shape) for name, path
            in pretrained.torch_names(variables, config.name).items()}
  assert shapes == learnable(reference_shapes(config))


@pytest.mark.parametrize('config_fn, count', [
    (tc.full_unet, tc.FULL_UNET_PARAMS), (tc.full_swin, tc.FULL_SWIN_PARAMS)])
def test_reference_layouts_have_the_pytorch_parameter_counts(config_fn, count):
  shapes = learnable(reference_shapes(config_fn()))
  assert sum(int(np.prod(shape)) for name, shape in shapes.items()
             if 'running_' not in name) == count


def test_layouts_compute_what_pytorch_computes():
  rng = np.random.default_rng(SEED)
  dim_in, dim_out = CHANNELS, 2 * CHANNELS
  weight = rng.standard_normal((dim_out, dim_in), dtype=np.float32)
  bias = rng.standard_normal((dim_out,), dtype=np.float32)
  x = rng.standard_normal((tc.BATCH, dim_in), dtype=np.float32)
  path = ('params', 'fc1', 'kernel')
  kernel = pretrained.from_torch_layout(path, weight)
  y = nn.Dense(dim_out).apply({'params': {'kernel': kernel, 'bias': bias}}, x)
  np.testing.assert_allclose(y, x @ weight.T + bias, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pretrained.to_torch_layout(path, kernel),
                                weight)

  # Conv2d: NCHW cross-correlation, padding 1, weight (O, I, kh, kw).
  weight = rng.standard_normal((dim_out, dim_in, KERNEL, KERNEL),
                               dtype=np.float32)
  image = rng.standard_normal((1, dim_in, SPATIAL, SPATIAL), dtype=np.float32)
  padded = np.pad(image, ((0, 0), (0, 0), (1, 1), (1, 1)))
  expected = np.zeros((1, dim_out, SPATIAL, SPATIAL), np.float32)
  for dy in range(KERNEL):
    for dx in range(KERNEL):
      window = padded[:, :, dy:dy + SPATIAL, dx:dx + SPATIAL]
      expected += np.einsum('bihw,oi->bohw', window, weight[:, :, dy, dx])
  path = ('params', 'inc', 'Conv_0', 'kernel')
  kernel = pretrained.from_torch_layout(path, weight)
  y = nn.Conv(dim_out, (KERNEL, KERNEL), padding=1, use_bias=False).apply(
      {'params': {'kernel': kernel}}, image.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_array_equal(pretrained.to_torch_layout(path, kernel),
                                weight)


def test_mapping_rejects_variables_it_does_not_know():
  with pytest.raises(ValueError, match='no Pytorch-UNet name'):
    pretrained.unet_torch_name(('params', 'inc', 'Dense_0', 'kernel'))
  with pytest.raises(ValueError, match="module 'head'"):
    pretrained.swin_torch_name(('params', 'head', 'kernel'))
  with pytest.raises(ValueError, match="leaf called 'gamma'"):
    pretrained.swin_torch_name(('params', 'norm', 'gamma'))
  with pytest.raises(ValueError, match="model 'vit'"):
    pretrained.export_torch_state_dict(abstract(tc.tiny_unet), 'vit')


# --- Import and export of trained models. ------------------------------------


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.tiny_swin])
def test_export_then_import_gives_the_same_variables_and_outputs(config_fn):
  config = config_fn()
  model, variables, images = _model_and_inputs(config_fn)
  state_dict = pretrained.export_torch_state_dict(variables, config.name)
  assert {name: value.shape for name, value in state_dict.items()} == (
      learnable(reference_shapes(config)))
  imported = pretrained.import_torch_state_dict(
      state_dict, abstract(config_fn), config.name)
  assert_trees_equal(imported, variables)
  apply = jax.jit(model.apply)
  logits, features = apply(variables, images)
  imported_logits, imported_features = apply(imported, images)
  assert np.isfinite(logits).all()
  np.testing.assert_array_equal(imported_logits, logits)
  np.testing.assert_array_equal(imported_features.final, features.final)


@pytest.mark.parametrize('with_prefix', [True, False])
@pytest.mark.parametrize('with_buffers', [True, False])
@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.tiny_swin])
def test_import_accepts_files_with_or_without_buffers_and_prefix(
    config_fn, with_buffers, with_prefix):
  """Buffers are ignored (here they even hold random values)."""
  config = config_fn()
  shapes = reference_shapes(config)
  state_dict = random_state_dict(shapes)
  assert any(RECOMPUTED.match(name) for name in state_dict)
  if not with_buffers:
    state_dict = {name: value for name, value in state_dict.items()
                  if not RECOMPUTED.match(name)}
  prefix = (pretrained.TORCH_MODELS[config.name].wrapper_prefix or ''
            if with_prefix else '')
  imported = pretrained.import_torch_state_dict(
      {prefix + name: value for name, value in state_dict.items()},
      abstract(config_fn), config.name)
  exported = pretrained.export_torch_state_dict(imported, config.name)
  assert exported.keys() == learnable(shapes).keys()
  for name, value in exported.items():
    np.testing.assert_array_equal(value, state_dict[name])


def test_wrapper_prefix_clash_is_an_error():
  state_dict = pretrained.export_torch_state_dict(
      random_variables(abstract(tc.tiny_swin)), 'swin_unet')
  state_dict['swin_unet.norm.weight'] = state_dict['norm.weight']
  with pytest.raises(ValueError, match="'norm.weight' occurs both"):
    pretrained.import_torch_state_dict(state_dict, abstract(tc.tiny_swin),
                                       'swin_unet')


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.tiny_swin])
def test_import_lists_every_gap_leftover_and_shape_mismatch(config_fn):
  config = config_fn()
  state_dict = pretrained.export_torch_state_dict(
      random_variables(abstract(config_fn)), config.name)
  names = sorted(state_dict)
  missing, (misshapen,) = names[-2:], names[:1]
  for name in missing:
    del state_dict[name]
  state_dict[misshapen] = np.zeros(state_dict[misshapen].shape + (1,))
  extra = ['zz_extra.weight', 'aa_extra.bias']
  for name in extra:
    state_dict[name] = np.zeros(1, np.float32)
  with pytest.raises(ValueError) as error:
    pretrained.import_torch_state_dict(state_dict, abstract(config_fn),
                                       config.name)
  message = str(error.value)
  for group in (missing, extra):
    positions = [message.index(name) for name in sorted(group)]
    assert positions == sorted(positions)  # All listed, sorted.
  assert f'{misshapen}: checkpoint' in message


# --- The public models' full state dicts (buffers and wrapper prefix). -------

BATCHES_TRACKED = 3  # Any count: num_batches_tracked carries it through.
CROSS_REGION_MASK = -100.0  # What Swin adds between tokens of two regions.


def zero_variables(config_fn):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                      abstract(config_fn))


def torch_relative_position_index(window):
  """Swin's index, token pair by pair (row-major tokens p, q of one window):
  (dy + w - 1) * (2w - 1) + (dx + w - 1), d = position of p minus that of q."""
  tokens = [(y, x) for y in range(window) for x in range(window)]
  return np.array([[(yp - yq + window - 1) * (2 * window - 1) + xp - xq
                    + window - 1 for yq, xq in tokens] for yp, xp in tokens],
                  np.int64)


@functools.cache
def torch_attn_mask(resolution, window, shift):
  """Swin's shifted-window mask, token pair by pair, windows row-major.

  After the cyclic shift each axis has three bands, [0, R-w), [R-w, R-s) and
  [R-s, R); two tokens of a window attend freely (0) when they lie in the same
  band on both axes, else the mask is -100.
  """
  def band(c):
    return (c >= resolution - window) + (c >= resolution - shift)

  count = resolution // window
  mask = np.zeros((count * count, window * window, window * window),
                  np.float32)
  for wy in range(count):
    for wx in range(count):
      regions = [(band(wy * window + a), band(wx * window + b))
                 for a in range(window) for b in range(window)]
      for p, region_p in enumerate(regions):
        for q, region_q in enumerate(regions):
          if region_p != region_q:
            mask[wy * count + wx, p, q] = CROSS_REGION_MASK
  return mask


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.full_unet,
                                       tc.tiny_swin, tc.full_swin])
def test_public_state_dict_has_every_name_shape_and_dtype_of_pytorch(
    config_fn):
  config = config_fn()
  state_dict = pretrained.public_torch_state_dict(zero_variables(config_fn),
                                                  config)
  prefix = 'swin_unet.' if config.name == 'swin_unet' else ''
  assert {name: (value.shape, value.dtype)
          for name, value in state_dict.items()} == {
              prefix + name: (shape, np.dtype(dtype))
              for name, (shape, dtype) in reference_shapes(config).items()}


@pytest.mark.parametrize('config_fn, counts', [
    (tc.full_unet, {'num_batches_tracked': 18}),  # 9 DoubleConvs x 2.
    # 8 encoder + 6 decoder blocks; the shifted odd blocks of the 56, 28 and
    # 14 stages in encoder and decoder (the 7x7 bottleneck does not shift).
    (tc.full_swin, {'relative_position_index': 14, 'attn_mask': 6}),
])
def test_full_size_public_state_dict_buffer_counts(config_fn, counts):
  config = config_fn()
  names = pretrained.public_torch_state_dict(zero_variables(config_fn),
                                             config)
  found = {kind: sum(name.endswith('.' + kind) for name in names)
           for kind in counts}
  assert found == counts


@pytest.mark.parametrize('config_fn', [tc.tiny_swin, tc.full_swin])
def test_public_swin_buffers_are_what_torch_computes(config_fn):
  config = config_fn()
  spec = SwinSpec.of(config)
  last = len(spec.depths) - 1
  state_dict = pretrained.public_torch_state_dict(zero_variables(config_fn),
                                                  config)
  buffers = {name: value for name, value in state_dict.items()
             if RECOMPUTED.match(name)}
  for name, value in buffers.items():
    kind, number, block = re.match(
        r'swin_unet\.(layers|layers_up)\.(\d+)\.blocks\.(\d+)\.', name).groups()
    stage = int(number) if kind == 'layers' else last - int(number)
    resolution = spec.image_size // spec.patch_size // 2 ** stage
    if name.endswith('relative_position_index'):
      expected = torch_relative_position_index(min(spec.window_size,
                                                   resolution))
    else:
      assert int(block) % 2 and resolution > spec.window_size, name
      expected = torch_attn_mask(resolution, spec.window_size,
                                 spec.window_size // 2)
    assert value.dtype == expected.dtype, name
    np.testing.assert_array_equal(value, expected, err_msg=name)
  assert any(name.endswith('attn_mask') for name in buffers)


@pytest.mark.parametrize('config_fn', [tc.tiny_unet, tc.tiny_swin])
def test_public_state_dict_holds_the_variables_and_imports_back(config_fn):
  config = config_fn()
  variables = random_variables(abstract(config_fn))
  state_dict = pretrained.public_torch_state_dict(
      variables, config, batches_tracked=BATCHES_TRACKED)
  prefix = pretrained.TORCH_MODELS[config.name].wrapper_prefix or ''
  bare = pretrained.export_torch_state_dict(variables, config.name)
  for name, value in bare.items():
    np.testing.assert_array_equal(state_dict[prefix + name], value)
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      assert value.shape == () and value == BATCHES_TRACKED, name
  assert_trees_equal(pretrained.import_torch_state_dict(
      state_dict, abstract(config_fn), config.name), variables)


# --- ImageNet Swin-T initialisation. -----------------------------------------


@pytest.fixture(scope='module')
def imagenet():
  """(config, random full-size Swin-UNet variables, synthetic Swin-T dict)."""
  return (tc.full_swin(), random_variables(abstract(tc.full_swin)),
          random_state_dict(swin_imagenet_shapes(SWIN_T_IMAGENET)))


def _block(name):
  match = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.', name)
  return (int(match[1]), int(match[2])) if match else None


def test_imagenet_swin_t_init_loads_mirrors_and_drops(imagenet):
  config, variables, source = imagenet
  depths = SwinSpec.of(config).depths
  last = len(depths) - 1
  result, report = pretrained.load_swin_imagenet(source, variables, config)
  ours, before = flat(result), flat(variables)

  for name, path in report.loaded:
    np.testing.assert_array_equal(ours[path],
                                  to_flax_layout(name, source[name]))
    block = _block(name)
    if block:
      assert path.startswith(f'params/layers_{block[0]}/blocks_{block[1]}/')
  for name, path in report.mirrored:
    np.testing.assert_array_equal(ours[path],
                                  to_flax_layout(name, source[name]))
    stage, index = _block(name)
    assert path.startswith(f'params/layers_up_{last - stage}/blocks_{index}/')
  for path in report.random_init:
    np.testing.assert_array_equal(ours[path], before[path])

  beyond_depth = {name for name in source if _block(name)
                  and _block(name)[1] >= depths[_block(name)[0]]}
  head = {name for name in source if name.startswith('head.')}
  buffers = {name for name in source if RECOMPUTED.match(name)}
  assert beyond_depth and buffers
  assert {name for name, _ in report.dropped} == (
      beyond_depth | head | buffers)
  assert {name for name, _ in report.loaded} == (
      set(source) - beyond_depth - head - buffers)
  assert {name for name, _ in report.mirrored} == {
      name for name in set(source) - beyond_depth - buffers
      if _block(name) and _block(name)[0] < last}
  # The final norm loads into the bottleneck norm, as the public load_from.
  assert ('norm.weight', 'params/norm/scale') in report.loaded
  assert ('norm.bias', 'params/norm/bias') in report.loaded

  # Left at init: decoder stage 0 (a PatchExpand), the decoder's concat
  # Linears and PatchExpands, norm_up, up and output.
  names = pretrained.torch_names(variables, 'swin_unet')
  paths = {'/'.join(path): name for name, path in names.items()}
  untouched = {paths[path] for path in report.random_init}
  assert untouched == {
      name for name in learnable(reference_shapes(config))
      if re.match(r'layers_up\.0\.|concat_back_dim\.|layers_up\.\d\.upsample\.'
                  r'|norm_up\.|up\.|output\.', name)}
  assert len(report.loaded) + len(report.mirrored) + len(
      report.random_init) == len(ours)

  table = pretrained.format_report(report)
  assert f'{len(report.loaded)} loaded, {len(report.mirrored)} mirrored' in (
      table)
  assert re.search(r'layers\.0\.blocks\.1\.attn\.qkv\.weight +-> '
                   r'params/layers_up_3/blocks_1/attn/qkv/kernel', table)
  assert re.search(r'head\.weight +: ImageNet classification head', table)
  assert re.search(r'\n  norm\.weight +-> params/norm/scale\n', table)


def test_imagenet_final_norm_can_be_kept_at_init(imagenet):
  config, variables, source = imagenet
  result, report = pretrained.load_swin_imagenet(source, variables, config,
                                                 load_final_norm=False)
  for name, path in (('norm.weight', 'params/norm/scale'),
                     ('norm.bias', 'params/norm/bias')):
    assert dict(report.dropped)[name] == pretrained.IMAGENET_FINAL_NORM_REASON
    assert path in report.random_init
    np.testing.assert_array_equal(flat(result)[path], flat(variables)[path])
  assert re.search(r'norm\.weight +: final norm, not loaded: '
                   r'config\.init\.load_final_norm=False',
                   pretrained.format_report(report))


def test_imagenet_shape_mismatch_raises_unless_the_entry_is_dropped(imagenet):
  config, variables, source = imagenet
  name = 'layers.1.blocks.0.mlp.fc1.weight'
  bad = dict(source, **{name: source[name][:-1]})
  with pytest.raises(ValueError) as error:
    pretrained.load_swin_imagenet(bad, variables, config)
  assert f'{name}: checkpoint' in str(error.value)
  assert 'layers_up.2.blocks.0.mlp.fc1.weight' in str(error.value)

  droppable = dict(source, **{'head.weight': np.zeros(1, np.float32),
                              'layers.2.blocks.5.norm1.weight': np.zeros(1)})
  pretrained.load_swin_imagenet(droppable, variables, config)


def test_imagenet_entry_unknown_to_the_model_raises(imagenet):
  config, variables, source = imagenet
  unknown = dict(source, absolute_pos_embed=np.zeros(1, np.float32))
  with pytest.raises(ValueError, match='not in the model .*\n  '
                     'absolute_pos_embed'):
    pretrained.load_swin_imagenet(unknown, variables, config)
  only_head = {name: source[name] for name in ('head.weight', 'head.bias')}
  with pytest.raises(ValueError, match='no entry to load'):
    pretrained.load_swin_imagenet(only_head, variables, config)
  with pytest.raises(ValueError, match="config.model.name='swin_unet'"):
    pretrained.load_swin_imagenet(source, variables, tc.full_unet())


def test_imagenet_init_from_a_torch_save_file(tmp_path, caplog):
  """A `{'model': state_dict}` torch.save archive at a tiny size."""
  config = tc.tiny_swin()
  spec = SwinSpec.of(config, depths=(2, 2, 4, 2))  # Stage 2 deeper than ours.
  source = random_state_dict(swin_imagenet_shapes(spec))
  path = _write_torch_zip(tmp_path / 'swin_tiny.pth', {'model': {
      name: _contiguous(value, str(i))
      for i, (name, value) in enumerate(source.items())}})
  _, variables, _ = _model_and_inputs(tc.tiny_swin)
  with caplog.at_level(logging.INFO):
    result, report = pretrained.load_swin_imagenet(path, variables, config)
  ours = flat(result)
  for name, target in report.loaded + report.mirrored:
    np.testing.assert_array_equal(ours[target],
                                  to_flax_layout(name, source[name]))
  assert 'layers.2.blocks.3.mlp.fc2.bias' in dict(report.dropped)
  assert report.mirrored and report.random_init
  assert str(path) in caplog.text and 'left at random init' in caplog.text
