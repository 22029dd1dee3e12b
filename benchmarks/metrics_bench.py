"""Speed of `selfreg_jax.evaluation.metrics` against the whole-volume (MedPy-style) way.

Builds a synthetic CT-like case: `--classes` organ-like ellipsoids with
irregular borders in a `--depth` x `--size` x `--size` label volume, the
prediction being a perturbed copy of the truth (shifted, rescaled, other
border noise, some false-positive islands). Then times Dice + Jaccard + HD95
+ ASSD for every class with `multiclass_metrics` and with
`full_volume_multiclass_metrics`, the unoptimised reference that computes as
MedPy does: surfaces and Euclidean distance transforms over the whole volume,
one pair of transforms for HD95 and another for ASSD. Reports both times
(ours: the median of several runs after a first one; the baseline: one run),
the speedup and the largest difference between the two results.

Suite `metrics` of `python -m benchmarks.run` (the 100x512x512 case with 8
organs, or SMOKE_SHAPE with --smoke). Other cases:

  python -m benchmarks.metrics_bench [--depth 100 --size 512 --classes 8]
      [--mode paper] [--spacing 2.5 0.75 0.75] [--out results.json] [--smoke]
"""

import argparse
import math
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from benchmarks import settings as settings_lib
from benchmarks import timing
from selfreg_jax.evaluation import metrics

SUITE = 'metrics'

# Synapse-like organs: (centre, semi-axes) as fractions of (depth, size, size).
ORGAN_SHAPES = (
    ((0.50, 0.55, 0.50), (0.40, 0.030, 0.030)),  # aorta
    ((0.45, 0.52, 0.36), (0.08, 0.035, 0.030)),  # gallbladder
    ((0.55, 0.60, 0.70), (0.15, 0.070, 0.050)),  # left kidney
    ((0.60, 0.60, 0.30), (0.15, 0.070, 0.050)),  # right kidney
    ((0.35, 0.45, 0.30), (0.36, 0.200, 0.160)),  # liver (cut by the scan)
    ((0.50, 0.52, 0.55), (0.08, 0.030, 0.120)),  # pancreas
    ((0.35, 0.55, 0.75), (0.15, 0.080, 0.060)),  # spleen
    ((0.30, 0.42, 0.62), (0.20, 0.100, 0.100)),  # stomach
)
BORDER_NOISE = 0.25  # amplitude of the border noise, in squared radius units
FULL_SHAPE = dict(depth=100, size=512, classes=8)
SMOKE_SHAPE = dict(depth=8, size=48, classes=3)
MODE = 'paper'
SEED = 0


def _wavy_field(rng: np.random.Generator, grids: Sequence[np.ndarray],
                radii: np.ndarray) -> np.ndarray:
  """Smooth noise in [-1, 1]: three random waves of about organ size."""
  field = 0.0
  for _ in range(3):
    frequency = rng.uniform(0.5, 2.0, size=len(grids)) / radii
    phase = rng.uniform(0, 2 * np.pi)
    field = field + np.sin(
        sum(f * g for f, g in zip(frequency, grids)) + phase)
  return field / 3.0


def _paint_ellipsoid(volume: np.ndarray, label: int, center: np.ndarray,
                     radii: np.ndarray, rng: np.random.Generator) -> None:
  """Writes `label` into a noisy ellipsoid (voxel units), clipped to volume."""
  reach = radii * (1.0 + BORDER_NOISE)
  low = np.clip(np.floor(center - reach).astype(int), 0, volume.shape)
  high = np.clip(np.ceil(center + reach).astype(int) + 1, 0, volume.shape)
  if np.any(high <= low):
    return
  grids = np.ogrid[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
  radius = sum(((g - c) / r)**2 for g, c, r in zip(grids, center, radii))
  inside = radius + BORDER_NOISE * _wavy_field(rng, grids, radii) < 1.0
  volume[tuple(slice(lo, hi) for lo, hi in zip(low, high))][inside] = label


def synthetic_case(depth: int, size: int, classes: int,
                   seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """A (prediction, truth) pair of uint8 label volumes (depth, size, size).

  Class k in 1..classes is organ ORGAN_SHAPES[(k - 1) % 8] with a random
  offset, painted largest first; the prediction moves it by a voxel or two,
  rescales it by up to 10 %, redraws the border noise and, for every other
  class, adds a small false-positive island beside the organ.
  """
  rng = np.random.default_rng(seed)
  scale = np.array([depth, size, size], dtype=np.float64)
  truth = np.zeros((depth, size, size), dtype=np.uint8)
  pred = np.zeros_like(truth)
  shapes = {
      label: ORGAN_SHAPES[(label - 1) % len(ORGAN_SHAPES)]
      for label in range(1, classes + 1)
  }
  # Largest organs first, so that the small ones painted later stay visible.
  for label in sorted(shapes, key=lambda k: -np.prod(shapes[k][1])):
    center_frac, radii_frac = shapes[label]
    center = (np.array(center_frac) + rng.uniform(-0.05, 0.05, 3)) * scale
    radii = np.maximum(np.array(radii_frac) * scale, 1.0)
    _paint_ellipsoid(truth, label, center, radii, rng)
    shift = rng.normal(0.0, 1.0, 3) * np.array([0.7, 2.0, 2.0]) * size / 512
    _paint_ellipsoid(pred, label, center + shift,
                     radii * rng.uniform(0.9, 1.1, 3), rng)
    if label % 2 == 0:
      direction = rng.normal(size=3)
      direction /= np.linalg.norm(direction)
      _paint_ellipsoid(pred, label, center + 1.5 * radii * direction,
                       np.maximum(0.15 * radii, 1.0), rng)
  return pred, truth


def full_volume_surface_distances(
    source: np.ndarray, target: np.ndarray,
    spacing: Optional[Sequence[float]]) -> np.ndarray:
  """Unoptimised reference: distances from source's to target's surface.

  Surfaces and the Euclidean distance transform over the whole volume, as
  MedPy computes them; distances in C order of the source surface voxels.
  """
  cross = ndimage.generate_binary_structure(source.ndim, 1)
  source_surface = source ^ ndimage.binary_erosion(
      source, structure=cross, iterations=1, border_value=0)
  target_surface = target ^ ndimage.binary_erosion(
      target, structure=cross, iterations=1, border_value=0)
  distance = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
  return distance[source_surface]


def full_volume_binary_metrics(pred: np.ndarray, truth: np.ndarray,
                               spacing: Optional[Sequence[float]],
                               mode: str) -> Dict[str, float]:
  """Unoptimised reference of `metrics.binary_metrics`, computed like MedPy.

  HD95 and ASSD each compute their own pair of whole-volume distance
  transforms, as separate MedPy calls do.
  """
  pred_size, truth_size = int(pred.sum()), int(truth.sum())
  if pred_size == 0 or truth_size == 0:
    if mode == 'paper':
      found = float(pred_size > 0)
      return dict(dice=found, jaccard=found, hd95=0.0, assd=0.0)
    overlap_score = 0.0 if pred_size + truth_size else math.nan
    return dict(dice=overlap_score, jaccard=overlap_score, hd95=math.nan,
                assd=math.nan)
  overlap = int((pred & truth).sum())
  result = dict(dice=2.0 * overlap / (pred_size + truth_size),
                jaccard=overlap / (pred_size + truth_size - overlap))
  forward = full_volume_surface_distances(pred, truth, spacing)
  backward = full_volume_surface_distances(truth, pred, spacing)
  if mode == 'paper':
    result['hd95'] = float(np.percentile(np.hstack((forward, backward)), 95))
  else:
    result['hd95'] = float(
        max(np.percentile(forward, 95), np.percentile(backward, 95)))
  forward = full_volume_surface_distances(pred, truth, spacing)
  backward = full_volume_surface_distances(truth, pred, spacing)
  if mode == 'paper':
    result['assd'] = float(np.mean((forward.mean(), backward.mean())))
  else:
    result['assd'] = float(np.concatenate((forward, backward)).mean())
  return result


def full_volume_multiclass_metrics(pred: np.ndarray, truth: np.ndarray,
                                   num_classes: int,
                                   spacing: Optional[Sequence[float]],
                                   mode: str) -> Dict[str, np.ndarray]:
  """Unoptimised reference of `metrics.multiclass_metrics(...).values`."""
  per_class = [
      full_volume_binary_metrics(pred == label, truth == label, spacing, mode)
      for label in range(1, num_classes)
  ]
  return {
      name: np.array([m[name] for m in per_class])
      for name in metrics.METRIC_NAMES
  }


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  """Largest |a - b|, NaN entries required at the same places (else inf)."""
  if not np.array_equal(np.isnan(a), np.isnan(b)):
    return math.inf
  valid = ~np.isnan(a)
  return float(np.max(np.abs(a[valid] - b[valid]), initial=0.0))


def run(depth: int, size: int, classes: int, mode: str,
        spacing: Optional[Sequence[float]], seed: int, repeats: int) -> Dict:
  """Times both implementations on one synthetic case; returns a summary.

  Ours: the median of `repeats` runs after a first, untimed one. The
  full-volume baseline: one run (it takes minutes at full size).
  """
  pred, truth = synthetic_case(depth, size, classes, seed)
  num_classes = classes + 1
  args = (pred, truth, num_classes, spacing, mode)
  ours = metrics.multiclass_metrics(*args)
  optimised_times = timing.run_times(metrics.multiclass_metrics, args,
                                     runs=repeats, warmup=0)
  start = time.perf_counter()
  reference = full_volume_multiclass_metrics(*args)
  baseline_seconds = time.perf_counter() - start
  optimised_seconds = timing.median(optimised_times)
  return dict(
      shape=[depth, size, size],
      num_classes=num_classes,
      mode=mode,
      spacing=None if spacing is None else list(spacing),
      seed=seed,
      optimised_seconds=optimised_seconds,
      baseline_seconds=baseline_seconds,
      speedup=baseline_seconds / optimised_seconds,
      max_abs_diff={
          name: _max_abs_diff(ours.values[name], reference[name])
          for name in metrics.METRIC_NAMES
      },
      bit_identical=all(
          np.array_equal(ours.values[name], reference[name], equal_nan=True)
          for name in metrics.METRIC_NAMES),
      values={name: ours.values[name].tolist()
              for name in metrics.METRIC_NAMES},
  )


def measurements(settings: settings_lib.Settings,
                 earlier: Sequence[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
  """The suite's one record: the full (or smoke) case, unit spacing."""
  del earlier  # independent of other suites
  shape = SMOKE_SHAPE if settings.smoke else FULL_SHAPE
  yield {'suite': SUITE, **run(mode=MODE, spacing=None, seed=SEED,
                               repeats=settings.runs, **shape)}


def summary_line(summary: Dict[str, Any]) -> str:
  return (f"case {summary['shape']}, {summary['num_classes']} classes, mode "
          f"{summary['mode']}, spacing {summary['spacing']}: ours "
          f"{summary['optimised_seconds']:.3f} s, full-volume baseline "
          f"{summary['baseline_seconds']:.3f} s, speedup "
          f"{summary['speedup']:.1f}x, max |diff| {summary['max_abs_diff']}, "
          f"bit-identical {summary['bit_identical']}")


def main(argv: Optional[Sequence[str]] = None) -> Dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=FULL_SHAPE['depth'])
  parser.add_argument('--size', type=int, default=FULL_SHAPE['size'])
  parser.add_argument('--classes', type=int, default=FULL_SHAPE['classes'],
                      help='foreground organ classes (background excluded)')
  parser.add_argument('--mode', choices=metrics.MODES, default=MODE)
  parser.add_argument('--spacing', type=float, nargs=3, default=None,
                      help='voxel size (depth, height, width) in mm')
  parser.add_argument('--seed', type=int, default=SEED)
  parser.add_argument('--repeats', type=int,
                      default=settings_lib.TIMED_RUNS,
                      help='timed runs of the optimised version (the median '
                      'counts)')
  parser.add_argument('--out', default=None, help='write the summary as JSON')
  parser.add_argument('--smoke', action='store_true',
                      help=f'tiny case {SMOKE_SHAPE} (overrides the sizes)')
  args = parser.parse_args(argv)
  shape = SMOKE_SHAPE if args.smoke else dict(
      depth=args.depth, size=args.size, classes=args.classes)
  if min(shape.values()) < 1:
    parser.error(f'depth, size and classes must be positive, got {shape}')
  summary = run(mode=args.mode, spacing=args.spacing, seed=args.seed,
                repeats=args.repeats, **shape)
  print(summary_line(summary))
  if args.out:
    timing.write_json(args.out, summary)
  return summary


if __name__ == '__main__':
  main()
