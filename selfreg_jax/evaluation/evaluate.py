"""Evaluation on whole cases: metrics, summary, table and optional files.

Protocol (docs/design.md section 4):
* volumetric sets (Synapse, ACDC, demo): each slice is predicted at
  `config.dataset.image_size` and the class map resized back to the native
  slice size (see `inference.predict_volume`); Dice, Jaccard, HD95 and ASSD
  of every foreground class on the whole volume. In 'paper' mode distances are
  in voxels (the reference test code passes no spacing); in 'standard' mode
  they are in mm, from the case's (z, y, x) spacing.
* 2D sets (GlaS, MoNuSeg): each image and its label are resized to
  `image_size` and compared there (Dice and IoU = Jaccard per image; HD95 and
  ASSD in pixels at that size are reported too).
Per-class means are taken over cases, the overall mean over classes
(`metrics.aggregate`).

Files written to `out_dir` (by process 0 only; each written to a temporary
name, then renamed):
  metrics_per_case.csv  one row per case and foreground class:
                        case_id, class_id, class_name, dice, jaccard, hd95,
                        assd (NaN written as 'nan')
  summary.json          the summary dict (NaN as null) without the table
  table.txt             the table of `format_table`
  predictions/<case_id>.nii.gz   with config.eval.save_predictions, volumetric
      sets only: uint8 class ids, array axes (x, y, z) = the case's (W, H, D)
      axes reversed, affine diag(x, y, z spacing in mm, 1) with origin 0 (the
      built data sets keep no scanner orientation)
  overlays/<case_id>.png   for case ids in config.eval.overlay_cases: the
      slice with the most labelled pixels as [image | truth | prediction]
      at the image's own size, classes in translucent colours
"""

import collections
from concurrent import futures
import csv
import dataclasses
import gzip
import io
import itertools
import pathlib
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

from absl import logging
from clu import metric_writers
import jax
import nibabel as nib
import numpy as np
from PIL import Image

from selfreg_jax.common import files
from selfreg_jax.core import checkpoints
from selfreg_jax.core import context
from selfreg_jax.core import input_pipeline
from selfreg_jax.evaluation import inference
from selfreg_jax.evaluation import metrics
from selfreg_jax.evaluation import visualize

METRICS_FILE = 'metrics_per_case.csv'
SUMMARY_FILE = 'summary.json'
TABLE_FILE = 'table.txt'
PREDICTIONS_DIR = 'predictions'
OVERLAYS_DIR = 'overlays'
EVAL_DIR = 'eval'
# Log progress of 2D sets every this many images.
_LOG_EVERY_IMAGES = 50
# Cases whose metrics may wait at once (bounds the memory they hold).
_MAX_PENDING_CASES = 2


@dataclasses.dataclass(frozen=True)
class PredictedCase:
  """A case's prediction next to its truth, on one grid.

  Attributes:
    case_id: identifier of the case.
    image: (D, H', W', C) float32 input at native size (only for overlays).
    prediction: (D, H, W) uint8 class ids.
    truth: (D, H, W) uint8 class ids.
    spacing: (z, y, x) voxel size of the (D, H, W) grid in mm.
  """
  case_id: str
  image: np.ndarray
  prediction: np.ndarray
  truth: np.ndarray
  spacing: tuple[float, float, float]


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  iterator = iter(items)
  while chunk := list(itertools.islice(iterator, size)):
    yield chunk


def _predict_cases(ctx: context.RunContext, predict_fn, variables: Any,
                   cases: Iterable[input_pipeline.Case],
                   batch_size: int) -> Iterator[PredictedCase]:
  """Predicts every case on the grid its metrics are computed on."""
  image_size = ctx.config.dataset.image_size
  if ctx.config.dataset.volumetric:
    for case in cases:
      prediction = inference.predict_volume(predict_fn, variables, case.image,
                                            image_size, batch_size)
      yield PredictedCase(case.case_id, case.image, prediction, case.label,
                          case.spacing)
    return
  for chunk in _batched(cases, batch_size):
    for case in chunk:
      if len(case.image) != 1:
        raise ValueError(
            f'Case {case.case_id!r} of a 2D data set has {len(case.image)} '
            'slices; expected 1 (is config.dataset.volumetric right?).')
    predictions, labels = inference.predict_images(
        predict_fn, variables, [case.image[0] for case in chunk],
        [case.label[0] for case in chunk], image_size, batch_size)
    for case, prediction, label in zip(chunk, predictions, labels):
      yield PredictedCase(case.case_id, case.image, prediction[None],
                          label[None], (1.0, 1.0, 1.0))


def evaluate_cases(ctx: context.RunContext, variables: Any,
                   cases: Iterable[input_pipeline.Case], *, split: str = '',
                   out_dir: str | pathlib.Path | None = None,
                   step: int | None = None,
                   run_info: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
  """Predicts and scores `cases`; see `evaluate_split`."""
  config = ctx.config
  mode = config.eval.metric_mode
  volumetric = config.dataset.volumetric
  num_classes = config.dataset.num_classes
  names = ctx.class_names
  predict_fn = inference.make_predict_fn(ctx.model, ctx.mesh)
  variables = jax.device_put(variables, ctx.replicated)
  batch_size = inference.round_up_batch_size(config.eval.batch_size, ctx.mesh)
  writes = out_dir is not None and jax.process_index() == 0
  out_dir = pathlib.Path(out_dir) if out_dir is not None else None
  overlay_ids = {str(case_id) for case_id in config.eval.overlay_cases}

  start = time.time()
  case_ids, case_metrics, num_slices = [], [], 0
  pending = collections.deque()

  def collect_oldest():
    case_id, case_slices, future = pending.popleft()
    case_ids.append(case_id)
    case_metrics.append(future.result())
    if volumetric:
      logging.info('%s case %s: %d slices, mean Dice %.4f (%.1f s so far)',
                   split, case_id, case_slices,
                   np.nanmean(case_metrics[-1].values['dice']),
                   time.time() - start)
    elif len(case_ids) % _LOG_EVERY_IMAGES == 0:
      logging.info('%s: %d images evaluated (%.1f s)', split, len(case_ids),
                   time.time() - start)

  # Metrics run in a thread (SciPy's k-d tree queries release the GIL) while
  # the next case is read, resized and predicted.
  with futures.ThreadPoolExecutor(max_workers=1) as pool:
    for case in _predict_cases(ctx, predict_fn, variables, cases, batch_size):
      spacing = case.spacing if mode == 'standard' else None
      pending.append((case.case_id, len(case.prediction), pool.submit(
          metrics.multiclass_metrics, case.prediction, case.truth,
          num_classes, spacing, mode)))
      num_slices += len(case.prediction)
      if writes and volumetric and config.eval.save_predictions:
        _write_nifti(out_dir / PREDICTIONS_DIR / f'{case.case_id}.nii.gz',
                     case.prediction, case.spacing)
      if writes and case.case_id in overlay_ids:
        _write_png(out_dir / OVERLAYS_DIR / f'{case.case_id}.png',
                   render_overlay(case))
      if len(pending) > _MAX_PENDING_CASES:
        collect_oldest()
    while pending:
      collect_oldest()
  if not case_metrics:
    raise ValueError(f'Split {split!r} of {config.dataset.name} has no cases.')
  seconds = time.time() - start

  summary = _summary(metrics.aggregate(case_metrics), names)
  summary.update(
      split=split, step=step, volumetric=volumetric,
      image_size=config.dataset.image_size,
      distance_unit=_distance_unit(volumetric, mode), num_slices=num_slices,
      seconds=seconds, slices_per_second=num_slices / seconds)
  summary.update(run_info or {})
  table = format_table(summary)
  logging.info('Evaluation of %s:\n%s', split, table)
  if writes:
    _write_text(out_dir / METRICS_FILE,
                _per_case_csv(case_ids, case_metrics, names))
    files.write_json(out_dir / SUMMARY_FILE, summary)
    _write_text(out_dir / TABLE_FILE, table + '\n')
  summary['table'] = table
  return summary


def evaluate_split(ctx: context.RunContext, variables: Any, split: str, *,
                   out_dir: str | pathlib.Path | None = None,
                   step: int | None = None,
                   run_info: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
  """Evaluates the context's model on every case of a split of its data set.

  Args:
    ctx: the run context (reads its model, mesh, data set, class names and
      config.dataset.{image_size, volumetric, num_classes} and eval.*);
      batches of config.eval.batch_size (rounded up to a multiple of the
      device count) are split over its mesh.
    variables: the model's variables.
    split: split name of the built data set (e.g. 'validation', 'test').
    out_dir: folder for the files listed in the module docstring; None
      writes nothing (validation during training).
    step: training step of `variables`, recorded in the summary.
    run_info: more entries of the summary (e.g. the training protocol).

  Returns:
    A summary dict: mean_dice, mean_jaccard, mean_hd95, mean_assd (floats;
    NaN only if every entry of a metric was NaN, standard mode), per_class
    and excluded ({metric: {class name: value / count of NaN cases left
    out}}), class_names, num_cases, num_slices, mode, distance_unit
    ('voxel', 'mm' or 'pixel'), split, step, volumetric, image_size,
    seconds, slices_per_second and table (the text of `format_table`).
  """
  return evaluate_cases(ctx, variables,
                        input_pipeline.iterate_cases(ctx.data, split),
                        split=split, out_dir=out_dir, step=step,
                        run_info=run_info)


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
  """A checkpoint of a run, ready to predict with.

  Attributes:
    variables: the checkpoint's model variables, replicated on the
      context's mesh.
    step: the checkpoint's step.
    info: checkpoint (the choice), protocol, train_slices, steps_per_epoch
      and epoch (the step in epochs) of the run.
  """
  variables: Any
  step: int
  info: dict[str, Any]


def restore_checkpoint(ctx: context.RunContext, workdir: str | pathlib.Path,
                       which: str) -> RestoredCheckpoint:
  """Restores checkpoint `which` ('best', 'latest', 'epoch:N' or a step) of
  `workdir`, whose model the context holds (`context.create(...,
  workdir=workdir)`).

  'epoch:N' counts epochs of the data set's training split in batches of
  the run's own batch size.
  """
  trained = ctx.saved_config or ctx.config  # the run's protocol and batch
  num_slices = ctx.data.num_slices(ctx.config.dataset.train_split)
  epoch_steps = input_pipeline.steps_per_epoch(num_slices, trained.batch_size)
  variables, step = checkpoints.restore_variables(
      workdir, ctx.abstract_variables, which, epoch_steps)
  info = dict(checkpoint=which, protocol=trained.get('protocol', 'validated'),
              train_slices=num_slices, steps_per_epoch=epoch_steps,
              epoch=step / epoch_steps)
  return RestoredCheckpoint(variables, step, info)


def evaluate_checkpoint(ctx: context.RunContext,
                        workdir: str | pathlib.Path, *,
                        split: str | None = None,
                        which: str | int | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on a split and writes the results.

  Args:
    ctx: the run context, built with `workdir` (so its model is the one the
      checkpoints were saved with).
    workdir: run folder holding `checkpoints/`.
    split: split to evaluate; default config.eval.split.
    which: 'best', 'latest', 'epoch:N' or a step; default
      config.eval.checkpoint.

  Returns:
    The summary of `evaluate_split` plus the run's `RestoredCheckpoint.info`
    (also in summary.json); files go to `workdir/eval/<split>_step<N>/`, and
    the summary's scalars (`summary_scalars`) to TensorBoard as
    '<split>/...' at step N.
  """
  split = split or ctx.config.eval.split
  which = str(ctx.config.eval.checkpoint if which is None else which)
  restored = restore_checkpoint(ctx, workdir, which)
  step = restored.step
  out_dir = pathlib.Path(workdir) / EVAL_DIR / f'{split}_step{step}'
  logging.info('Evaluating checkpoint %s (step %d) of %s on split %r into %s',
               which, step, workdir, split, out_dir)
  summary = evaluate_split(ctx, restored.variables, split, out_dir=out_dir,
                           step=step, run_info=restored.info)
  if jax.process_index() == 0:
    writer = metric_writers.SummaryWriter(str(workdir))
    writer.write_scalars(step, {f'{split}/{k}': v for k, v in
                                summary_scalars(summary).items()})
    writer.close()
  return summary


# ----------------------------------------------------------------------------
# Summary and table.


def _distance_unit(volumetric: bool, mode: str) -> str:
  if not volumetric:
    return 'pixel'
  return 'mm' if mode == 'standard' else 'voxel'


def _summary(aggregated: metrics.MetricSummary,
             names: Sequence[str]) -> dict[str, Any]:
  summary = {f'mean_{name}': float(aggregated.mean[name])
             for name in metrics.METRIC_NAMES}
  summary.update(
      mode=aggregated.mode,
      num_cases=aggregated.num_cases,
      class_names=list(names),
      per_class={name: dict(zip(names, map(float, values)))
                 for name, values in aggregated.per_class.items()},
      excluded={name: dict(zip(names, map(int, counts)))
                for name, counts in aggregated.excluded.items()})
  return summary


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
  """The metrics of a summary for TensorBoard: mean_<metric> of every metric,
  and dice/<class> and hd95/<class> (spaces in names become '_')."""
  scalars = {f'mean_{name}': summary[f'mean_{name}']
             for name in metrics.METRIC_NAMES}
  for metric in ('dice', 'hd95'):
    for name, value in summary['per_class'][metric].items():
      scalars[f'{metric}/{name.replace(" ", "_")}'] = value
  return scalars


def format_table(summary: dict[str, Any]) -> str:
  """Per-class and mean scores, like the paper's tables.

  Volumetric sets: Dice (%) and HD95; 2D sets: Dice (%) and IoU (%). In
  standard mode a last column counts the cases left out of HD95 (NaN).
  """
  if summary['volumetric']:
    columns = (('Dice (%)', 'dice', 100.0),
               (f"HD95 ({summary['distance_unit']})", 'hd95', 1.0))
  else:
    columns = (('Dice (%)', 'dice', 100.0), ('IoU (%)', 'jaccard', 100.0))
  show_excluded = summary['mode'] == 'standard'
  names = summary['class_names']
  width = max(len(n) for n in names + ['class'])
  header = f"{'class':<{width}}" + ''.join(f'  {t:>10}' for t, _, _ in columns)
  if show_excluded:
    header += '  excl. HD95'
  lines = [
      f"split {summary['split']!r}"
      + ('' if summary['step'] is None else f", step {summary['step']}")
      + f", {summary['num_cases']} cases, {summary['mode']} mode", header]
  for name in names:
    row = f'{name:<{width}}' + ''.join(
        f"  {scale * summary['per_class'][key][name]:>10.2f}"
        for _, key, scale in columns)
    if show_excluded:
      row += f"  {summary['excluded']['hd95'][name]:>10d}"
    lines.append(row)
  lines.append(f"{'mean':<{width}}" + ''.join(
      f"  {scale * summary['mean_' + key]:>10.2f}"
      for _, key, scale in columns))
  return '\n'.join(lines)


def _per_case_csv(case_ids: Sequence[str],
                  case_metrics: Sequence[metrics.CaseMetrics],
                  names: Sequence[str]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(('case_id', 'class_id', 'class_name') + metrics.METRIC_NAMES)
  for case_id, result in zip(case_ids, case_metrics):
    for k, name in enumerate(names):
      writer.writerow([case_id, k + 1, name] + [
          repr(float(result.values[m][k])) for m in metrics.METRIC_NAMES])
  return buffer.getvalue()


# ----------------------------------------------------------------------------
# Images and files.


def render_overlay(case: PredictedCase) -> np.ndarray:
  """[image | truth | prediction] at the image's own size, (H', 3W', 3) uint8.

  Shows the slice with the most labelled (truth or predicted) pixels; the
  class maps, resized (nearest) to the image's (H', W') where they were
  scored on another grid (2D sets: at image_size), are drawn over the image
  as translucent class colours (`visualize.overlay`).
  """
  labelled = ((case.truth > 0) | (case.prediction > 0)).sum(axis=(1, 2))
  index = int(np.argmax(labelled))
  image = case.image[index]
  panels = [visualize.to_rgb(image)] + [
      visualize.overlay(image, inference.resize_labels(labels, image.shape[:2]))
      for labels in (case.truth[index], case.prediction[index])]
  return np.round(np.concatenate(panels, axis=1) * 255).astype(np.uint8)


def _write_text(path: pathlib.Path, text: str) -> None:
  files.write_atomic(path, text.encode())


def _write_png(path: pathlib.Path, rgb: np.ndarray) -> None:
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format='PNG')
  files.write_atomic(path, buffer.getvalue())


def _write_nifti(path: pathlib.Path, prediction: np.ndarray,
                 spacing: Sequence[float]) -> None:
  """(D, H, W) class ids with (z, y, x) spacing -> gzipped NIfTI-1."""
  z, y, x = (float(s) for s in spacing)
  image = nib.Nifti1Image(np.transpose(prediction, (2, 1, 0)),
                          affine=np.diag([x, y, z, 1.0]))
  image.header.set_xyzt_units('mm')
  files.write_atomic(path, gzip.compress(image.to_bytes()))
