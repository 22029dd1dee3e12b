"""selfreg_jax.evaluation.metrics against brute-force and whole-volume references."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from benchmarks import metrics_bench
from selfreg_jax.evaluation import metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_SHAPES = ((11, 13), (6, 7, 8))
LARGE_SHAPES = ((40, 44), (18, 30, 34))
ANISOTROPIC = {2: (0.7, 1.9), 3: (2.5, 0.6, 1.3)}
SEEDS = (0, 1, 2)
FILL_FRACTION = 0.45
NUM_CLASSES = 5
RTOL = 1e-12


# ----------------------------------------------------------------- references


def brute_surface_coords(mask, spacing):
  """Coordinates (mm) of voxels in the mask with a cross neighbour outside."""
  coords = []
  for index in np.ndindex(mask.shape):
    if not mask[index]:
      continue
    for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
      neighbour = list(index)
      neighbour[axis] += step
      if (not 0 <= neighbour[axis] < mask.shape[axis] or
          not mask[tuple(neighbour)]):
        coords.append(index)
        break
  return np.array(coords, dtype=np.float64) * np.array(spacing)


def brute_directed(source, target):
  """For each source point, the distance to the nearest target point."""
  pairwise = np.linalg.norm(source[:, None, :] - target[None, :, :], axis=-1)
  return pairwise.min(axis=1)


def brute_metrics(pred, truth, spacing, mode):
  """The module docstring's definitions, by counting and all-pairs distances."""
  spacing = spacing or (1.0,) * pred.ndim
  both, either = np.sum(pred & truth), np.sum(pred | truth)
  if pred.any() and truth.any():
    p_surface = brute_surface_coords(pred, spacing)
    t_surface = brute_surface_coords(truth, spacing)
    forward = brute_directed(p_surface, t_surface)
    backward = brute_directed(t_surface, p_surface)
    if mode == 'paper':
      hd95 = np.percentile(np.concatenate([forward, backward]), 95)
      assd = (forward.mean() + backward.mean()) / 2
    else:
      hd95 = max(np.percentile(forward, 95), np.percentile(backward, 95))
      assd = np.concatenate([forward, backward]).mean()
    return dict(dice=2 * both / (pred.sum() + truth.sum()),
                jaccard=both / either, hd95=hd95, assd=assd)
  return expected_empty(pred.any(), truth.any(), mode)


def expected_empty(pred_found, truth_found, mode):
  """The empty-mask rules, written out case by case."""
  nan = math.nan
  table = {
      ('paper', True, False): (1.0, 1.0, 0.0, 0.0),
      ('paper', False, True): (0.0, 0.0, 0.0, 0.0),
      ('paper', False, False): (0.0, 0.0, 0.0, 0.0),
      ('standard', True, False): (0.0, 0.0, nan, nan),
      ('standard', False, True): (0.0, 0.0, nan, nan),
      ('standard', False, False): (nan, nan, nan, nan),
  }
  return dict(zip(metrics.METRIC_NAMES, table[mode, pred_found, truth_found]))


def as_dict(result):
  return {name: getattr(result, name) for name in metrics.METRIC_NAMES}


def assert_metrics_close(actual, expected):
  for name in metrics.METRIC_NAMES:
    np.testing.assert_allclose(
        actual[name], expected[name], rtol=RTOL, atol=0, equal_nan=True,
        err_msg=name)


def random_mask(rng, shape):
  return rng.random(shape) < FILL_FRACTION


def random_label_pair(rng, shape, num_classes):
  """(pred, truth) label volumes with irregular, multi-component organs.

  Each class is a thresholded smooth random field (several components, some
  cut by the volume border) plus single voxels; the prediction is a noisy copy.
  Class 1 fills a whole face of the volume; the last class is missing from the
  prediction and the one before it from the truth.
  """
  truth = np.zeros(shape, dtype=np.uint8)
  pred = np.zeros(shape, dtype=np.uint8)
  for label in range(1, num_classes):
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
    threshold = np.quantile(field, 0.85)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.0)
    singles = tuple(rng.integers(0, shape, size=(3, len(shape))).T)
    if label != num_classes - 2:
      truth[field > threshold] = label
      truth[singles] = label
    if label != num_classes - 1:
      perturbed = field + 0.5 * field.std() / noise.std() * noise
      pred[perturbed > threshold] = label
      pred[tuple(rng.integers(0, shape, size=(3, len(shape))).T)] = label
  truth[(0,) + (slice(None),) * (len(shape) - 1)] = 1
  pred[(slice(0, 2),) + (slice(None),) * (len(shape) - 1)] = 1
  return pred, truth


# ---------------------------------------------------------- binary: correctness


@pytest.mark.parametrize('shape', SMALL_SHAPES)
@pytest.mark.parametrize('anisotropic', (False, True))
@pytest.mark.parametrize('mode', metrics.MODES)
@pytest.mark.parametrize('seed', SEEDS)
def test_binary_metrics_match_brute_force(shape, anisotropic, mode, seed):
  rng = np.random.default_rng(seed)
  pred, truth = random_mask(rng, shape), random_mask(rng, shape)
  spacing = ANISOTROPIC[len(shape)] if anisotropic else None
  actual = metrics.binary_metrics(pred, truth, spacing, mode)
  assert_metrics_close(as_dict(actual), brute_metrics(pred, truth, spacing,
                                                      mode))


def test_paper_and_standard_hd95_differ_as_defined():
  """A far-off false positive: pooled vs per-direction percentile differ.

  The two outlier voxels are over 5 % of the prediction's surface but under
  5 % of both surfaces pooled.
  """
  shape = SMALL_SHAPES[1]
  truth = np.zeros(shape, dtype=bool)
  truth[1:4, 1:4, 1:4] = True
  pred = truth.copy()
  pred[-1, -1, -2:] = True
  paper = metrics.binary_metrics(pred, truth, mode='paper')
  standard = metrics.binary_metrics(pred, truth, mode='standard')
  assert standard.hd95 > paper.hd95
  assert_metrics_close(as_dict(paper), brute_metrics(pred, truth, None,
                                                     'paper'))
  assert_metrics_close(as_dict(standard),
                       brute_metrics(pred, truth, None, 'standard'))


@pytest.mark.parametrize('shape', SMALL_SHAPES)
@pytest.mark.parametrize('mode', metrics.MODES)
@pytest.mark.parametrize('pred_found,truth_found',
                         list(itertools.product((True, False), repeat=2)))
def test_empty_mask_rules(shape, mode, pred_found, truth_found):
  rng = np.random.default_rng(len(shape))
  pred = random_mask(rng, shape) & pred_found
  truth = random_mask(rng, shape) & truth_found
  actual = as_dict(metrics.binary_metrics(pred, truth, mode=mode))
  if pred_found and truth_found:
    assert all(np.isfinite(list(actual.values())))
  else:
    assert_metrics_close(actual, expected_empty(pred_found, truth_found, mode))


# ----------------------------------------- optimised vs whole-volume reference


@pytest.mark.parametrize('shape', LARGE_SHAPES)
@pytest.mark.parametrize('mode', metrics.MODES)
@pytest.mark.parametrize('anisotropic', (False, True))
def test_multiclass_equals_whole_volume_reference(shape, mode, anisotropic):
  rng = np.random.default_rng(len(shape))
  pred, truth = random_label_pair(rng, shape, NUM_CLASSES)
  spacing = ANISOTROPIC[len(shape)] if anisotropic else None
  actual = metrics.multiclass_metrics(pred, truth, NUM_CLASSES, spacing, mode)
  expected = metrics_bench.full_volume_multiclass_metrics(
      pred, truth, NUM_CLASSES, spacing, mode)
  assert actual.mode == mode and actual.num_classes == NUM_CLASSES
  for name in metrics.METRIC_NAMES:
    assert actual.values[name].shape == (NUM_CLASSES - 1,)
    if anisotropic:
      np.testing.assert_allclose(actual.values[name], expected[name],
                                 rtol=RTOL, atol=0, equal_nan=True)
    else:  # integer offsets: bit-identical
      np.testing.assert_array_equal(actual.values[name], expected[name])
  # The missing classes follow the empty rules.
  assert_metrics_close({k: v[-1] for k, v in actual.values.items()},
                       expected_empty(False, True, mode))
  assert_metrics_close({k: v[-2] for k, v in actual.values.items()},
                       expected_empty(True, False, mode))


@pytest.mark.parametrize('shape', LARGE_SHAPES)
def test_binary_single_voxels_at_corners_equal_reference(shape):
  pred = np.zeros(shape, dtype=bool)
  truth = np.zeros(shape, dtype=bool)
  pred[(0,) * len(shape)] = True
  truth[tuple(s - 1 for s in shape)] = True
  truth[(0,) * (len(shape) - 1) + (shape[-1] - 1,)] = True
  spacing = ANISOTROPIC[len(shape)]
  for mode in metrics.MODES:
    actual = metrics.binary_metrics(pred, truth, spacing, mode)
    expected = metrics_bench.full_volume_binary_metrics(pred, truth, spacing,
                                                        mode)
    assert_metrics_close(as_dict(actual), expected)


# ----------------------------------------------------------------- aggregation


def square_labels(shape, squares):
  """Label volume with label -> (row, col) top-left corner of a 2x2 square."""
  labels = np.zeros(shape, dtype=np.uint8)
  for label, (row, col) in squares.items():
    labels[row:row + 2, col:col + 2] = label
  return labels


AGGREGATION_SHAPE = (8, 8)
AGGREGATION_CLASSES = 3
SQUARE_AT = {1: (1, 1), 2: (5, 5)}
# (pred squares, truth squares) per case.
AGGREGATION_CASES = (
    ({1: SQUARE_AT[1]}, SQUARE_AT),  # class 2 missed
    (SQUARE_AT, SQUARE_AT),  # perfect
    ({2: SQUARE_AT[2]}, {2: SQUARE_AT[2]}),  # class 1 absent from both
)


def aggregation_cases(mode):
  return [
      metrics.multiclass_metrics(
          square_labels(AGGREGATION_SHAPE, pred),
          square_labels(AGGREGATION_SHAPE, truth), AGGREGATION_CLASSES,
          mode=mode) for pred, truth in AGGREGATION_CASES
  ]


def test_aggregate_paper_mode_averages_cases_then_classes():
  summary = metrics.aggregate(aggregation_cases('paper'))
  # Dice per case: class 1 -> 1, 1, 0 (absent from both counts as 0);
  # class 2 -> 0, 1, 1. Every distance is 0.
  np.testing.assert_allclose(summary.per_class['dice'], [2 / 3, 2 / 3])
  assert summary.mean['dice'] == pytest.approx(2 / 3)
  np.testing.assert_array_equal(summary.per_class['hd95'], [0.0, 0.0])
  assert summary.num_cases == len(AGGREGATION_CASES)
  for name in metrics.METRIC_NAMES:
    np.testing.assert_array_equal(summary.excluded[name], [0, 0])


def test_aggregate_standard_mode_excludes_and_counts_nans():
  summary = metrics.aggregate(aggregation_cases('standard'))
  # Dice: class 1 -> 1, 1, NaN; class 2 -> 0, 1, 1.
  np.testing.assert_allclose(summary.per_class['dice'], [1.0, 2 / 3])
  assert summary.mean['dice'] == pytest.approx(5 / 6)
  np.testing.assert_array_equal(summary.excluded['dice'], [1, 0])
  # HD95: class 1 -> 0, 0, NaN; class 2 -> NaN, 0, 0.
  np.testing.assert_array_equal(summary.per_class['hd95'], [0.0, 0.0])
  np.testing.assert_array_equal(summary.excluded['hd95'], [1, 1])
  np.testing.assert_array_equal(summary.excluded['assd'], [1, 1])


@pytest.mark.filterwarnings('ignore:Mean of empty slice:RuntimeWarning')
def test_aggregate_equals_nan_mean_on_random_cases():
  shape = LARGE_SHAPES[0]
  cases = []
  for seed in SEEDS:
    pred, truth = random_label_pair(np.random.default_rng(seed), shape,
                                    NUM_CLASSES)
    cases.append(metrics.multiclass_metrics(pred, truth, NUM_CLASSES,
                                            mode='standard'))
  summary = metrics.aggregate(cases)
  for name in metrics.METRIC_NAMES:
    table = np.stack([case.values[name] for case in cases])
    np.testing.assert_allclose(summary.per_class[name],
                               np.nanmean(table, axis=0), rtol=RTOL)
    np.testing.assert_array_equal(summary.excluded[name],
                                  np.isnan(table).sum(axis=0))
    assert summary.mean[name] == pytest.approx(
        np.nanmean(summary.per_class[name]), rel=RTOL)
  assert summary.excluded['hd95'].sum() >= 2 * len(SEEDS)


def test_aggregate_all_nan_class_gives_nan_mean_not_warning():
  case = metrics.multiclass_metrics(
      square_labels(AGGREGATION_SHAPE, {}),
      square_labels(AGGREGATION_SHAPE, {}), AGGREGATION_CLASSES,
      mode='standard')
  with np.errstate(all='raise'):
    summary = metrics.aggregate([case])
  assert np.isnan(summary.per_class['dice']).all()
  assert math.isnan(summary.mean['dice'])
  np.testing.assert_array_equal(summary.excluded['dice'], [1, 1])


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize('call,message', [
    (lambda: metrics.binary_metrics(
        np.ones((4, 4), bool), np.ones((4, 5), bool)), 'shapes differ'),
    (lambda: metrics.binary_metrics(
        np.ones((4, 4), bool), np.ones((4, 4), bool), (1.0,)), 'one value'),
    (lambda: metrics.binary_metrics(
        np.ones((4, 4), bool), np.ones((4, 4), bool), (1.0, 0.0)), 'positive'),
    (lambda: metrics.binary_metrics(
        np.ones((4, 4), bool), np.ones((4, 4), bool), (1.0, -2.0)),
     'positive'),
    (lambda: metrics.binary_metrics(
        np.ones((4, 4), bool), np.ones((4, 4), bool), (1.0, math.nan)),
     'positive'),
    (lambda: metrics.binary_metrics(
        np.ones((4, 4), bool), np.ones((4, 4), bool), mode='medpy'), 'mode'),
    (lambda: metrics.binary_metrics(
        np.ones((4, 4), np.uint8), np.ones((4, 4), bool)), 'bool'),
    (lambda: metrics.binary_metrics(
        np.ones(4, bool), np.ones(4, bool)), '2D or 3D'),
    (lambda: metrics.multiclass_metrics(
        np.full((4, 4), 3), np.zeros((4, 4), int), 3), 'labels must lie'),
    (lambda: metrics.multiclass_metrics(
        np.zeros((4, 4)), np.zeros((4, 4)), 3), 'integer labels'),
    (lambda: metrics.multiclass_metrics(
        np.zeros((4, 4), int), np.zeros((4, 4), int), 1), 'num_classes'),
    (lambda: metrics.multiclass_metrics(
        np.zeros((4, 4, 4), int), np.zeros((4, 4), int), 3), 'shapes differ'),
    (lambda: metrics.aggregate([]), 'at least one case'),
    (lambda: metrics.aggregate(aggregation_cases('paper') +
                               aggregation_cases('standard')), 'one mode'),
])
def test_bad_input_raises_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ------------------------------------------------------------------- benchmark


def test_benchmark_smoke_writes_matching_json(tmp_path):
  out = tmp_path / 'bench.json'
  subprocess.run(
      [sys.executable, '-m', 'benchmarks.metrics_bench', '--smoke', '--out',
       str(out)],
      cwd=REPO_ROOT, check=True, capture_output=True, text=True)
  summary = json.loads(out.read_text())
  smoke = metrics_bench.SMOKE_SHAPE
  assert summary['shape'] == [smoke['depth'], smoke['size'], smoke['size']]
  assert summary['num_classes'] == smoke['classes'] + 1
  assert summary['optimised_seconds'] > 0 and summary['baseline_seconds'] > 0
  assert summary['speedup'] == pytest.approx(
      summary['baseline_seconds'] / summary['optimised_seconds'])
  assert summary['bit_identical'] is True
  assert summary['max_abs_diff'] == {name: 0.0 for name in metrics.METRIC_NAMES}
  for name in metrics.METRIC_NAMES:
    assert len(summary['values'][name]) == smoke['classes']
  assert 0 < min(summary['values']['dice']) <= 1
  assert list(tmp_path.iterdir()) == [out]
