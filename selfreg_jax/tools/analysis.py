"""Grad-CAM maps and channel similarity of a trained model's feature taps.

  python -m selfreg_jax.tools.analysis --config configs/demo.py --workdir RUN \
      --case demo_test_000 --class 1 --split test

For one case of a split, the slice with the most truth pixels of class K (the
middle slice if the case has none) is resized to `config.dataset.image_size`
and run through the checkpoint's model. For every tap of `Features` (encoder
and decoder stages, the first-block taps of Swin stages, and `final`):

* Grad-CAM: S = sum of the class-K logit over the pixels predicted as K (the
  whole image if none is); alpha_c = mean over space of dS/dA_c;
  CAM = ReLU(sum_c alpha_c A_c), of the tap's spatial size (h, w). For a
  one-logit binary model, class 1 is the logit and its region logit > 0.
* channel similarity: the (C, C) cosine similarity between the tap's channel
  maps flattened over space, and its mean off-diagonal entry. A channel that
  is zero everywhere has similarity 0 with the others; the diagonal is 1.

How the gradient reaches a tap without touching the model code: the model is
run under `flax.linen.intercept_methods`. A first, shape-only trace records the
output leaves of every submodule call and finds, for each tap array of the
returned `Features`, the first call that produced that very array. The
gradient pass adds a zero "delta" to exactly those outputs; dS/d(delta) at
zero is dS/dA, the total derivative through everything downstream of the tap.

Files, in `RUN/analysis/<split>_<case>_class<K>_step<N>/` (each written to a
temporary name, then renamed):
  gradcam.png     the input slice with class K's truth in its translucent
                  colour, then one Grad-CAM overlay per tap (upsampled
                  bilinearly), all at the case's own size and aspect
  similarity.png  one similarity matrix per tap, titled with its mean
                  off-diagonal similarity
  analysis.json   per tap: shape, mean off-diagonal similarity, Grad-CAM
                  max and mean; the case, slice, class, step and score
  maps.npz        the raw Grad-CAM maps ('gradcam/<tap>') and similarity
                  matrices ('similarity/<tap>')
The same figures and numbers go to TensorBoard (clu metric_writers) in
`RUN/analysis/`, at the checkpoint's step.
"""

import io
import pathlib
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
from matplotlib import figure as mpl_figure
from ml_collections import config_flags
import numpy as np
from PIL import Image

from selfreg_jax.common import cli
from selfreg_jax.common import files
from selfreg_jax.common import runtime
from selfreg_jax.core import checkpoints
from selfreg_jax.core import context
from selfreg_jax.core import input_pipeline
from selfreg_jax.core import outputs
from selfreg_jax.core.models import Features
from selfreg_jax.evaluation import evaluate
from selfreg_jax.evaluation import inference
from selfreg_jax.evaluation import visualize

ANALYSIS_DIR = 'analysis'
# NaN (e.g. the similarity of a one-channel tap) -> null.
# A module call: (module path, index of this call of that module).
CallKey = tuple[tuple[str, ...], int]


# ----------------------------------------------------------------------------
# Numbers.


def named_taps(features: Features) -> dict[str, jax.Array]:
  """The tap maps of `features` by name: encoder_<i>, decoder_<i>,
  encoder_first_<i>, decoder_first_<i> (shallow to deep / deep to shallow, as
  in `Features`) and final; each (B, h, w, C)."""
  taps = {}
  for group in ('encoder', 'decoder', 'encoder_first', 'decoder_first'):
    for i, tap in enumerate(getattr(features, group)):
      taps[f'{group}_{i}'] = tap
  taps['final'] = features.final
  return taps


def class_score(logits: jax.Array, class_id: int) -> jax.Array:
  """Sum of the class logit over the pixels predicted as that class.

  logits: (B, H, W, K), or (B, H, W, 1) for a one-logit binary model (then
  class_id must be 1 and the region is logit > 0); class_id may be traced.
  Where no pixel is
  predicted as the class, the sum runs over the whole image. The region is a
  constant of the gradient.
  """
  logit, region = outputs.class_logit_and_region(logits, class_id)
  region = jnp.where(region.any(), region, True)
  return jnp.sum(logit * jax.lax.stop_gradient(region.astype(logit.dtype)))


def grad_cam(activation: jax.Array, gradient: jax.Array) -> jax.Array:
  """ReLU(sum_c mean_hw(dS/dA_c) A_c): (h, w, C) twice -> (h, w), >= 0."""
  weights = jnp.mean(gradient, axis=(0, 1))
  return jax.nn.relu(jnp.einsum('hwc,c->hw', activation, weights))


@jax.jit
def channel_similarity(activation: jax.Array) -> jax.Array:
  """(h, w, C) map -> (C, C) cosine similarity of the flattened channels.

  Zero channels have similarity 0 with every other channel; the diagonal is
  1 by definition.
  """
  flat = activation.reshape(-1, activation.shape[-1]).astype(jnp.float32)
  norms = jnp.linalg.norm(flat, axis=0)
  unit = flat / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
  similarity = unit.T @ unit
  return jnp.fill_diagonal(similarity, 1.0, inplace=False)


def mean_off_diagonal(matrix: jax.Array) -> float:
  """Mean of the entries of a (C, C) matrix off its diagonal (C > 1)."""
  size = matrix.shape[0]
  if size < 2:
    return float('nan')
  total = jnp.sum(matrix) - jnp.trace(matrix)
  return float(total / (size * (size - 1)))


# ----------------------------------------------------------------------------
# Gradients with respect to the taps, through an interceptor.


def _interceptor(calls: list[tuple[CallKey, list[Any]]] | None,
                 deltas: dict[CallKey, dict[int, jax.Array]]) -> Callable:
  """Records every submodule call's output leaves into `calls` (if given)
  and adds `deltas[key][leaf]` to the chosen output leaves."""
  counts = {}

  def intercept(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return output
    path = tuple(context.module.path)
    key = (path, counts.get(path, 0))
    counts[path] = key[1] + 1
    leaves, treedef = jax.tree.flatten(output)
    if calls is not None:
      calls.append((key, leaves))
    if key in deltas:
      leaves = [leaf + deltas[key][i] if i in deltas[key] else leaf
                for i, leaf in enumerate(leaves)]
      output = jax.tree.unflatten(treedef, leaves)
    return output
  return intercept


def locate_taps(model: nn.Module, variables: Any,
                image: jax.Array) -> dict[str, tuple[CallKey, int]]:
  """For each tap name: the (call, output leaf) that first produced it.

  Traces `model.apply(variables, image)` for shapes only. Raises ValueError
  if a tap is not the output of any submodule call (a model computing a tap
  outside submodules would need the gradient pass extended).
  """
  calls, located = [], {}

  def trace(variables, image):
    with nn.intercept_methods(_interceptor(calls, {})):
      _, features = model.apply(variables, image)
    for name, tap in named_taps(features).items():
      for key, leaves in calls:
        index = next((i for i, leaf in enumerate(leaves) if leaf is tap), None)
        if index is not None:
          located[name] = (key, index)
          break
      else:
        raise ValueError(f'Tap {name!r} of {type(model).__name__} is not the '
                         'output of a submodule call; Grad-CAM cannot reach '
                         'it without a hook in the model.')
    return ()
  jax.eval_shape(trace, variables, image)
  return located


def tap_gradients(model: nn.Module, variables: Any, image: jax.Array,
                  class_id: int
                  ) -> tuple[jax.Array, dict[str, jax.Array],
                             dict[str, jax.Array]]:
  """Class score, tap activations and dS/d(tap) of one image.

  image: (1, S, S, C_in). Returns (score, {tap: (h, w, C)}, {tap: (h, w, C)}).
  """
  located = locate_taps(model, variables, image)
  shapes = jax.eval_shape(lambda v, x: named_taps(model.apply(v, x)[1]),
                          variables, image)

  def score_fn(tap_deltas, variables, image, class_id):
    deltas = {}
    for name, (key, index) in located.items():
      deltas.setdefault(key, {})[index] = tap_deltas[name]
    with nn.intercept_methods(_interceptor(None, deltas)):
      logits, features = model.apply(variables, image)
    return class_score(logits, class_id), named_taps(features)

  zeros = {name: jnp.zeros(shape.shape, shape.dtype)
           for name, shape in shapes.items()}
  # The class is traced: one program serves every class.
  (score, taps), grads = jax.jit(jax.value_and_grad(score_fn, has_aux=True))(
      zeros, variables, image, jnp.asarray(class_id, jnp.int32))
  return (score, {name: taps[name][0] for name in located},
          {name: grads[name][0] for name in located})


# ----------------------------------------------------------------------------
# Choosing the slice and drawing.


def pick_slice(label: np.ndarray, class_id: int) -> int:
  """Index of the slice of `label` (D, H, W) with most pixels of the class;
  the middle slice when no slice holds it."""
  counts = (label == class_id).sum(axis=(1, 2))
  return int(np.argmax(counts)) if counts.max() > 0 else len(label) // 2


def upsample(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """(h, w) map -> `shape` (H, W), bilinear."""
  return np.asarray(jax.image.resize(cam, shape, 'bilinear'))


def gradcam_overlay(image: np.ndarray, cam: np.ndarray,
                    alpha: float = 0.5) -> np.ndarray:
  """(S, S, C) image and (S, S) CAM -> (S, S, 3) float in [0, 1], jet map
  of the CAM scaled to its maximum blended over the image."""
  peak = float(cam.max())
  heat = matplotlib.colormaps['jet'](cam / peak if peak > 0 else cam)[..., :3]
  return (1 - alpha) * visualize.to_rgb(image) + alpha * heat


def _panel_grid(count: int, aspect: float = 1.0, size: float = 2.6):
  """A figure of `count` panels of `size` inches wide, height / width =
  `aspect`, in rows of up to 4."""
  columns = min(count, 4)
  rows = -(-count // columns)
  figure = mpl_figure.Figure(figsize=(size * columns,
                                      (size * aspect + 0.4) * rows))
  axes = figure.subplots(rows, columns, squeeze=False)
  for axis in axes.flat[count:]:
    axis.axis('off')
  return figure, list(axes.flat)


def gradcam_figure(image: np.ndarray, truth: np.ndarray, class_id: int,
                   cams: dict[str, np.ndarray], title: str) -> bytes:
  """PNG: the input with the class's truth in its translucent colour, then
  one overlay per tap, all at the image's own size and aspect.

  image: (H, W, C); truth: (H, W) bool; cams: tap -> (H, W) upsampled map.
  """
  height, width = truth.shape
  figure, axes = _panel_grid(len(cams) + 1, aspect=height / width)
  axes[0].imshow(visualize.overlay(image, np.where(truth, class_id, 0)))
  axes[0].set_title('input + truth', fontsize=9)
  for axis, (name, cam) in zip(axes[1:], cams.items()):
    axis.imshow(gradcam_overlay(image, cam))
    axis.set_title(name if cam.max() > 0 else f'{name} (all 0)', fontsize=9)
  for axis in axes:
    axis.set_xticks([])
    axis.set_yticks([])
  figure.suptitle(title, fontsize=10)
  return files.figure_png(figure)


def similarity_figure(matrices: dict[str, np.ndarray],
                      means: dict[str, float], title: str) -> bytes:
  """PNG: one (C, C) similarity matrix per tap, colour range [-1, 1]."""
  figure, axes = _panel_grid(len(matrices))
  for axis, (name, matrix) in zip(axes, matrices.items()):
    shown = axis.imshow(matrix, vmin=-1, vmax=1, cmap='coolwarm')
    axis.set_title(f'{name}: mean {means[name]:.3f}', fontsize=9)
    axis.set_xticks([])
    axis.set_yticks([])
  figure.colorbar(shown, ax=axes, shrink=0.6)
  figure.suptitle(title, fontsize=10)
  return files.figure_png(figure)


def _png_array(png: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(png)).convert('RGB'))


# ----------------------------------------------------------------------------
# Whole analysis of a case.


def find_case(data: input_pipeline.DataSet, split: str,
              case_id: str) -> input_pipeline.Case:
  """The case `case_id` of a split; UserError listing the ids if absent."""
  seen = []
  for case in input_pipeline.iterate_cases(data, split):
    if case.case_id == case_id:
      return case
    seen.append(case.case_id)
  raise cli.UserError(f'Case {case_id!r} is not in split {split!r} of '
                      f'{data.directory}; its cases: {seen}.')


def check_class(num_outputs: int, class_id: int) -> None:
  valid = outputs.class_ids(num_outputs)
  if class_id not in valid:
    raise cli.UserError(f'--class={class_id}: the model of config.model '
                        f'({num_outputs} outputs) has classes {valid}.')


def analyze_case(ctx: context.RunContext, workdir: str | pathlib.Path,
                 case_id: str, class_id: int, split: str = 'test',
                 which: str = 'best') -> pathlib.Path:
  """Runs the analysis of the module docstring; returns its output folder.

  `ctx` is built with `workdir` (`context.create`), so its model is the
  checkpoints' own.
  """
  workdir = pathlib.Path(workdir)
  config, model = ctx.config, ctx.model
  check_class(ctx.num_outputs, class_id)
  restored = evaluate.restore_checkpoint(ctx, workdir, which)
  step = restored.step
  case = find_case(ctx.data, split, case_id)
  index = pick_slice(case.label, class_id)
  image = case.image[index]  # (H, W, C) at the case's own size
  truth = case.label[index] == class_id
  model_input = inference.resize_image(image, config.dataset.image_size)

  # One image on one device: host copies of the (replicated) variables.
  score, taps, grads = tap_gradients(
      model, jax.device_get(restored.variables),
      jnp.asarray(model_input[None]), class_id)
  cams = {name: np.asarray(grad_cam(taps[name], grads[name])) for name in taps}
  matrices = {name: np.asarray(channel_similarity(tap))
              for name, tap in taps.items()}
  means = {name: mean_off_diagonal(m) for name, m in matrices.items()}

  names = ctx.class_names
  class_name = names[class_id - 1] if class_id > 0 else 'background'
  where = f'{case_id} slice {index}' if config.dataset.volumetric else case_id
  title = f'{where}, class {class_id} ({class_name}), step {step}'
  out_dir = (workdir / ANALYSIS_DIR /
             f'{split}_{case_id}_class{class_id}_step{step}')
  gradcam_png = gradcam_figure(
      image, truth, class_id,
      {n: upsample(c, truth.shape) for n, c in cams.items()}, title)
  similarity_png = similarity_figure(matrices, means, title)
  numbers = dict(
      case_id=case_id, split=split, slice_index=index, class_id=class_id,
      class_name=class_name, step=step, checkpoint=which,
      class_score=float(score),
      taps={name: dict(shape=list(taps[name].shape),
                       mean_offdiag_similarity=means[name],
                       gradcam_max=float(cams[name].max()),
                       gradcam_mean=float(cams[name].mean()))
            for name in taps})
  arrays = io.BytesIO()
  np.savez_compressed(arrays, **{f'gradcam/{n}': c for n, c in cams.items()},
                      **{f'similarity/{n}': m for n, m in matrices.items()})
  files.write_atomic(out_dir / 'gradcam.png', gradcam_png)
  files.write_atomic(out_dir / 'similarity.png', similarity_png)
  files.write_atomic(out_dir / 'maps.npz', arrays.getvalue())
  files.write_json(out_dir / 'analysis.json', numbers)

  prefix = f'{split}/{case_id}/class{class_id}'
  writer = metric_writers.create_default_writer(workdir / ANALYSIS_DIR)
  writer.write_images(step, {f'{prefix}/gradcam': _png_array(gradcam_png)[None],
                             f'{prefix}/similarity':
                                 _png_array(similarity_png)[None]})
  writer.write_scalars(step, {f'{prefix}/offdiag_similarity/{name}': value
                              for name, value in means.items()})
  writer.close()
  logging.info('Analysis of %s (class %d, step %d) written to %s', case_id,
               class_id, step, out_dir)
  return out_dir


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpoints.require_checkpoints(FLAGS.workdir)  # before opening data
  ctx = context.create(FLAGS.config, 'eval', workdir=FLAGS.workdir,
                       overridden=cli.config_overrides())
  config = ctx.config
  analyze_case(ctx, FLAGS.workdir, FLAGS.case, FLAGS['class'].value,
               FLAGS.split or config.eval.split,
               FLAGS.checkpoint or str(config.eval.checkpoint))


if __name__ == '__main__':
  runtime.prepare_process()
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run folder holding checkpoints/.')
  flags.DEFINE_string('case', None, 'Case id of the split to analyse.')
  flags.DEFINE_integer('class', 1, 'Class whose score Grad-CAM explains.')
  flags.DEFINE_string('split', None, 'Split; default config.eval.split.')
  flags.DEFINE_string('checkpoint', None, "'best', 'latest' or a step; "
                      'default config.eval.checkpoint.')
  flags.mark_flags_as_required(['config', 'workdir', 'case'])
  cli.run_app(main)
