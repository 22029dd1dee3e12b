"""Segmentation metrics of 2D/3D masks: Dice, Jaccard, HD95, ASSD (host-side).

Definitions shared by both modes
--------------------------------
* Masks are bool arrays of one shape, 2D `(H, W)` or 3D `(D, H, W)`.
  `spacing` gives the voxel size per axis (mm); `None` means unit spacing, so
  distances are in voxels.
* Dice = 2|P & T| / (|P| + |T|); Jaccard = |P & T| / |P | T|.
* Surface of a mask = the mask minus its binary erosion by the cross-shaped
  (connectivity-1) structuring element, one iteration, with voxels outside the
  volume counted as background (so mask voxels on the volume border are
  surface voxels).
* d(P->T) = for every surface voxel of P (in C order), the Euclidean distance,
  scaled by `spacing`, to the nearest surface voxel of T; d(T->P) likewise.

mode='paper' (MedPy as called by the TransUNet / Swin-UNet test code)
--------------------------------------------------------------------
* HD95 = np.percentile(concat(d(P->T), d(T->P)), 95) (linear interpolation)
  over the POOLED distances of both directions.
* ASSD = mean(mean(d(P->T)), mean(d(T->P))).
* P and T non-empty: the four metrics as above.
  P non-empty, T empty: Dice 1, Jaccard 1, HD95 0, ASSD 0.
  P empty (whether T is empty or not): Dice 0, Jaccard 0, HD95 0, ASSD 0.
  No metric is ever NaN.

mode='standard' (the usual convention of the evaluation literature)
-------------------------------------------------------------------
* HD95 = max(np.percentile(d(P->T), 95), np.percentile(d(T->P), 95)).
* ASSD = mean of the pooled distances concat(d(P->T), d(T->P)), i.e.
  (sum d(P->T) + sum d(T->P)) / (#surface(P) + #surface(T)).
* P and T non-empty: the four metrics as above.
  Exactly one of P, T empty: Dice 0, Jaccard 0, HD95 NaN, ASSD NaN.
  P and T both empty: all four NaN.
* `aggregate` leaves NaN entries out of every mean and reports how many it
  left out per class and metric.

Speed
-----
The results equal a whole-volume computation done the MedPy way (erosion and
Euclidean distance transforms of the whole volume, per class and direction),
but the work is confined to what can matter:
* the bounding boxes of all classes of a label volume come from one
  `scipy.ndimage.find_objects` pass per volume, and each class is processed
  inside the box of `P | T` only; eroding there with background outside the
  box sees exactly the neighbourhood the whole-volume erosion sees;
* the distance from a surface voxel to the nearest surface voxel of the other
  mask is a nearest-neighbour query among surface voxels, answered by a k-d
  tree (built once per surface) instead of a distance transform of the whole
  volume; the distance itself is formed from the integer voxel offset with the
  arithmetic of `scipy.ndimage.distance_transform_edt`, so values match it
  (bit for bit with unit spacing; with other spacings up to float rounding in
  exact ties between equally near voxels);
* both directed distance sets are computed once per class and HD95 and ASSD
  are read from them.
"""

import dataclasses
import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy import spatial

MODES = ('paper', 'standard')
METRIC_NAMES = ('dice', 'jaccard', 'hd95', 'assd')

Spacing = Optional[Sequence[float]]
Box = Tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class BinaryMetrics:
  """Metrics of one binary mask pair; distances in `spacing` units (mm)."""
  dice: float
  jaccard: float
  hd95: float
  assd: float


@dataclasses.dataclass(frozen=True)
class CaseMetrics:
  """Metrics of one labelled case, per foreground class.

  Attributes:
    mode: 'paper' or 'standard', the convention the values follow.
    values: metric name (see METRIC_NAMES) -> float64 array of shape
      (num_classes - 1,); entry k belongs to class k + 1.
  """
  mode: str
  values: Mapping[str, np.ndarray]

  @property
  def num_classes(self) -> int:
    """Number of classes, background included."""
    return len(self.values[METRIC_NAMES[0]]) + 1


@dataclasses.dataclass(frozen=True)
class MetricSummary:
  """Metrics averaged over cases, then over classes.

  Attributes:
    mode: the convention of the averaged cases.
    num_cases: how many cases were averaged.
    per_class: metric name -> float64 array (num_classes - 1,), the mean over
      cases of each class, NaN entries left out (NaN if all entries were NaN).
    mean: metric name -> mean over classes of `per_class`, NaN classes left out.
    excluded: metric name -> int array (num_classes - 1,), the number of NaN
      entries left out per class (always 0 in paper mode).
  """
  mode: str
  num_cases: int
  per_class: Mapping[str, np.ndarray]
  mean: Mapping[str, float]
  excluded: Mapping[str, np.ndarray]


def binary_metrics(pred: np.ndarray,
                   truth: np.ndarray,
                   spacing: Spacing = None,
                   mode: str = 'paper') -> BinaryMetrics:
  """Dice, Jaccard, HD95 and ASSD of a predicted mask against the truth.

  Args:
    pred: bool array (H, W) or (D, H, W), the predicted mask.
    truth: bool array of the same shape, the reference mask.
    spacing: voxel size per axis in mm, or None for unit spacing.
    mode: 'paper' or 'standard' (see the module docstring).

  Returns:
    The four metrics; HD95 and ASSD in the units of `spacing`.
  """
  _check_mode(mode)
  _check_shapes(pred, truth)
  for name, mask in (('pred', pred), ('truth', truth)):
    if mask.dtype != np.bool_:
      raise ValueError(
          f'{name} must be a bool mask, got dtype {mask.dtype} (pass e.g. '
          f'{name} > 0)')
  sampling = _check_spacing(spacing, pred.ndim)
  box = ndimage.find_objects((pred | truth).view(np.uint8))
  if not box:
    return _empty_pair_metrics(mode)
  return _metrics_in_box(pred[box[0]], truth[box[0]], sampling, mode)


def multiclass_metrics(pred: np.ndarray,
                       truth: np.ndarray,
                       num_classes: int,
                       spacing: Spacing = None,
                       mode: str = 'paper') -> CaseMetrics:
  """Metrics of every foreground class 1..num_classes-1 of one case.

  Args:
    pred: integer label array (H, W) or (D, H, W), values in [0, num_classes).
    truth: integer label array of the same shape and range.
    num_classes: number of classes, background (label 0) included.
    spacing: voxel size per axis in mm, or None for unit spacing.
    mode: 'paper' or 'standard' (see the module docstring).

  Returns:
    A CaseMetrics with one entry per foreground class.
  """
  _check_mode(mode)
  _check_shapes(pred, truth)
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(
        f'num_classes must be an integer >= 2, got {num_classes!r}')
  for name, labels in (('pred', pred), ('truth', truth)):
    _check_labels(name, labels, num_classes)
  sampling = _check_spacing(spacing, pred.ndim)
  pred_boxes = ndimage.find_objects(pred, max_label=num_classes - 1)
  truth_boxes = ndimage.find_objects(truth, max_label=num_classes - 1)
  per_class = []
  for label, (pred_box, truth_box) in enumerate(
      zip(pred_boxes, truth_boxes), start=1):
    box = _union_box(pred_box, truth_box)
    if box is None:
      per_class.append(_empty_pair_metrics(mode))
    else:
      per_class.append(
          _metrics_in_box(pred[box] == label, truth[box] == label, sampling,
                          mode))
  values = {
      name: np.array([getattr(m, name) for m in per_class], dtype=np.float64)
      for name in METRIC_NAMES
  }
  return CaseMetrics(mode=mode, values=values)


def aggregate(cases: Sequence[CaseMetrics]) -> MetricSummary:
  """Averages over cases, then over classes, leaving NaN entries out.

  Args:
    cases: per-case metrics, all of one mode and one number of classes.

  Returns:
    The per-class means, the overall means and the NaN counts per class.
  """
  if not cases:
    raise ValueError('aggregate needs at least one case, got none')
  modes = {case.mode for case in cases}
  sizes = {case.num_classes for case in cases}
  if len(modes) != 1 or len(sizes) != 1:
    raise ValueError(
        f'all cases must share one mode and num_classes, got modes '
        f'{sorted(modes)} and num_classes {sorted(sizes)}')
  per_class, mean, excluded = {}, {}, {}
  for name in METRIC_NAMES:
    table = np.stack([case.values[name] for case in cases])  # (cases, classes)
    per_class[name] = _nan_excluding_mean(table)
    mean[name] = float(_nan_excluding_mean(per_class[name][:, None])[0])
    excluded[name] = np.isnan(table).sum(axis=0)
  return MetricSummary(
      mode=modes.pop(),
      num_cases=len(cases),
      per_class=per_class,
      mean=mean,
      excluded=excluded)


def _nan_excluding_mean(table: np.ndarray) -> np.ndarray:
  """Mean over axis 0 of the non-NaN entries; NaN where a column has none."""
  valid = ~np.isnan(table)
  totals = np.where(valid, table, 0.0).sum(axis=0)
  counts = valid.sum(axis=0)
  return np.divide(
      totals,
      counts,
      out=np.full(totals.shape, np.nan),
      where=counts > 0)


def _metrics_in_box(pred: np.ndarray, truth: np.ndarray,
                    sampling: Tuple[float, ...], mode: str) -> BinaryMetrics:
  """Metrics of two bool masks cropped to (a box holding) their union."""
  pred_size = int(np.count_nonzero(pred))
  truth_size = int(np.count_nonzero(truth))
  overlap = int(np.count_nonzero(pred & truth))
  if pred_size == 0 or truth_size == 0:
    return _metrics_with_empty_mask(pred_size, truth_size, mode)
  dice = 2.0 * overlap / float(pred_size + truth_size)
  jaccard = overlap / float(pred_size + truth_size - overlap)
  pred_surface, truth_surface = _surface_voxels(pred), _surface_voxels(truth)
  pred_to_truth = _nearest_distances(pred_surface, truth_surface, sampling)
  truth_to_pred = _nearest_distances(truth_surface, pred_surface, sampling)
  if mode == 'paper':
    hd95 = np.percentile(np.hstack((pred_to_truth, truth_to_pred)), 95)
    assd = np.mean((pred_to_truth.mean(), truth_to_pred.mean()))
  else:
    hd95 = max(np.percentile(pred_to_truth, 95),
               np.percentile(truth_to_pred, 95))
    assd = np.concatenate((pred_to_truth, truth_to_pred)).mean()
  return BinaryMetrics(
      dice=dice, jaccard=jaccard, hd95=float(hd95), assd=float(assd))


def _metrics_with_empty_mask(pred_size: int, truth_size: int,
                             mode: str) -> BinaryMetrics:
  """The empty-mask rules of the module docstring."""
  if mode == 'paper':
    if pred_size > 0:
      return BinaryMetrics(dice=1.0, jaccard=1.0, hd95=0.0, assd=0.0)
    return BinaryMetrics(dice=0.0, jaccard=0.0, hd95=0.0, assd=0.0)
  overlap_score = 0.0 if pred_size + truth_size > 0 else math.nan
  return BinaryMetrics(
      dice=overlap_score, jaccard=overlap_score, hd95=math.nan, assd=math.nan)


def _empty_pair_metrics(mode: str) -> BinaryMetrics:
  """Metrics when prediction and truth are both empty."""
  return _metrics_with_empty_mask(0, 0, mode)


def _surface_voxels(mask: np.ndarray) -> np.ndarray:
  """Coordinates (n, ndim), C order, of the surface voxels of a bool mask.

  The surface is the mask minus its erosion by the cross-shaped structuring
  element with background outside the array: a voxel is interior when it and
  its 2 * ndim axis neighbours are all in the mask. This is
  `mask ^ scipy.ndimage.binary_erosion(mask, generate_binary_structure(ndim,
  1), border_value=0)`, done with array slices on a zero-padded copy.
  """
  padded = np.pad(mask, 1)
  interior = mask.copy()
  for axis in range(mask.ndim):
    for step in (-1, 1):
      neighbours = [slice(1, -1)] * mask.ndim
      neighbours[axis] = slice(1 + step, padded.shape[axis] - 1 + step)
      interior &= padded[tuple(neighbours)]
  return np.argwhere(mask & ~interior)


def _nearest_distances(source: np.ndarray, target: np.ndarray,
                       sampling: Tuple[float, ...]) -> np.ndarray:
  """Distance from each source voxel to its nearest target voxel, in mm.

  Args:
    source: (n, ndim) integer voxel coordinates.
    target: (m, ndim) integer voxel coordinates, m > 0.
    sampling: voxel size per axis.

  Returns:
    float64 (n,). The nearest target voxel comes from a k-d tree over the
    target in mm; the distance to it is then formed from the integer offsets
    with the arithmetic of `scipy.ndimage.distance_transform_edt`, so the
    values equal that transform's output at the source voxels.
  """
  scale = np.asarray(sampling, dtype=np.float64)
  _, nearest = spatial.KDTree(target * scale).query(source * scale)
  offsets = target[nearest] - source
  squared = np.zeros(len(source), dtype=np.float64)
  for axis, step in enumerate(sampling):
    offset = offsets[:, axis].astype(np.float64) * step
    squared += offset * offset
  return np.sqrt(squared)


def _union_box(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
  """Smallest box holding both boxes; None if both are None."""
  if a is None or b is None:
    return a if b is None else b
  return tuple(
      slice(min(sa.start, sb.start), max(sa.stop, sb.stop))
      for sa, sb in zip(a, b))


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
  for name, array in (('pred', pred), ('truth', truth)):
    if not isinstance(array, np.ndarray):
      raise ValueError(f'{name} must be a numpy array, got {type(array)}')
    if array.ndim not in (2, 3):
      raise ValueError(f'{name} must be 2D or 3D, got shape {array.shape}')
  if pred.shape != truth.shape:
    raise ValueError(
        f'pred and truth shapes differ: {pred.shape} vs {truth.shape}')


def _check_labels(name: str, labels: np.ndarray, num_classes: int) -> None:
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name} must hold integer labels, got dtype '
                     f'{labels.dtype}')
  low, high = labels.min(), labels.max()
  if low < 0 or high >= num_classes:
    raise ValueError(f'{name} labels must lie in [0, {num_classes}), got '
                     f'values in [{low}, {high}]')


def _check_spacing(spacing: Spacing, ndim: int) -> Tuple[float, ...]:
  """The spacing as a tuple of positive floats, one per axis."""
  if spacing is None:
    return (1.0,) * ndim
  sampling = tuple(float(s) for s in np.ravel(np.asarray(spacing)))
  if len(sampling) != ndim:
    raise ValueError(f'spacing must have one value per axis ({ndim}), got '
                     f'{len(sampling)}: {sampling}')
  if not all(math.isfinite(s) and s > 0 for s in sampling):
    raise ValueError(f'spacing must be positive and finite, got {sampling}')
  return sampling
