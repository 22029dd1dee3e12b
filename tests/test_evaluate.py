"""Tests of selfreg_jax.evaluation.evaluate on tiny models, constructed cases and a
tiny built demo data set (CPU)."""

import csv
import json
import math

import jax
import nibabel as nib
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
import tensorflow_datasets as tfds

from configs import base
from data_prep import build
from data_prep import demo
from selfreg_jax.common import cli
from selfreg_jax.core import checkpoints
from selfreg_jax.core import context
from selfreg_jax.core import input_pipeline
from selfreg_jax.core.models import create_model
from selfreg_jax.evaluation import evaluate
from selfreg_jax.evaluation import inference
from selfreg_jax.evaluation import metrics
from selfreg_jax.evaluation import visualize
from test_inference import BATCH_SIZE
from test_inference import IMAGE_SIZE
from test_inference import make_mesh
from test_inference import numpy_variables
from test_inference import predicting_constant
from test_inference import tiny_unet

# Constructed volumetric cases: (case_id, (D, H, W), spacing (z, y, x)).
CASES = (('case_a', (3, 21, 30), (2.5, 0.7, 0.7)),
         ('case_b', (2, 27, 19), (3.0, 0.8, 0.8)))
# Constructed 2D images (H, W).
IMAGES_2D = ((40, 50), (29, 33), (64, 48))
# Options of the smallest useful demo build.
DEMO_OPTIONS = dict(num_train_cases=1, num_validation_cases=1,
                    num_test_cases=2, min_slices=2, max_slices=3, min_size=20,
                    max_size=27)
CHECKPOINT_STEP = 7


def _context(config):
  """The run context of `config` without a data set (constructed cases)."""
  return context.create(config, 'eval', open_data=False)


def _config(dataset: str = 'demo', metric_mode: str = 'paper'):
  config = base.get_config(dataset, 'unet')
  config.dataset.image_size = IMAGE_SIZE
  config.model = tiny_unet(config.model.num_classes,
                           config.dataset.in_channels)
  config.eval.batch_size = BATCH_SIZE
  config.eval.metric_mode = metric_mode
  return config


def _blob_labels(shape, num_classes: int, seed: int) -> np.ndarray:
  """(D, H, W) uint8 labels: one box per class 1..num_classes-1, class
  num_classes-1 absent (to exercise empty truth)."""
  rng = np.random.default_rng(seed)
  labels = np.zeros(shape, np.uint8)
  for k in range(1, num_classes - 1):
    corner = [int(rng.integers(0, n // 2)) for n in shape[1:]]
    size = [max(2, n // 3) for n in shape[1:]]
    labels[:, corner[0]:corner[0] + size[0],
           corner[1]:corner[1] + size[1]] = k
  return labels


def _volume_cases(num_classes: int, channels: int = 1):
  rng = np.random.default_rng(0)
  return [
      input_pipeline.Case(
          case_id, rng.random(shape + (channels,), dtype=np.float32),
          _blob_labels(shape, num_classes, seed), spacing)
      for seed, (case_id, shape, spacing) in enumerate(CASES)
  ]


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def demo_model():
  config = _config()
  model = create_model(config.model)
  return model, numpy_variables(model, IMAGE_SIZE, 1)


def test_class_names_come_from_the_built_data_set(tmp_path):
  """The build records the source's class names; a set built before names
  were recorded reads as generic names."""
  config = _config()
  config.dataset.data_dir = str(tmp_path)
  dataset_dir = build.build_dataset('demo', data_dir=tmp_path, **DEMO_OPTIONS)
  assert input_pipeline.DataSet.open(config.dataset).class_names == (
      demo.CLASS_NAMES[1:])
  metadata_file = dataset_dir / 'metadata.json'
  metadata = json.loads(metadata_file.read_text())
  del metadata['class_names']
  metadata_file.write_text(json.dumps(metadata))
  assert input_pipeline.DataSet.open(config.dataset).class_names == tuple(
      f'class_{k}' for k in range(1, config.dataset.num_classes))


def _oracle_class_maps(model, variables, cases) -> list[np.ndarray]:
  """(D, H, W) class ids of each case as docs/design.md section 4 defines them,
  without selfreg_jax.evaluation.inference: every slice zoomed to IMAGE_SIZE (cubic
  spline, per channel), the argmax of the model's logits zoomed back to
  (H, W) with nearest neighbour."""
  inputs, shapes = [], []
  for case in cases:
    height, width = case.image.shape[1:3]
    factors = (IMAGE_SIZE / height, IMAGE_SIZE / width)
    inputs += [np.stack([ndimage.zoom(image[..., c], factors, order=3)
                         for c in range(image.shape[-1])], axis=-1)
               for image in case.image]
    shapes.append(case.label.shape)
  logits, _ = jax.jit(lambda x: model.apply(variables, x, train=False))(
      np.stack(inputs))
  classes = np.asarray(jax.numpy.argmax(logits, axis=-1)).astype(np.uint8)
  maps, start = [], 0
  for depth, height, width in shapes:
    maps.append(np.stack([
        ndimage.zoom(c, (height / IMAGE_SIZE, width / IMAGE_SIZE), order=0)
        for c in classes[start:start + depth]]))
    start += depth
  return maps


def _oracle_metrics(pred: np.ndarray, truth: np.ndarray, spacing,
                    mode: str) -> dict[str, float]:
  """Dice, Jaccard, HD95, ASSD of two bool masks by the conventions of
  selfreg_jax/evaluation/metrics.py's docstring (docs/design.md section 4), from SciPy's
  erosion and Euclidean distance transform of the whole volume."""
  if not pred.any() or not truth.any():
    if mode == 'paper':
      score = 1.0 if pred.any() else 0.0
      return dict(dice=score, jaccard=score, hd95=0.0, assd=0.0)
    score = 0.0 if pred.any() or truth.any() else math.nan
    return dict(dice=score, jaccard=score, hd95=math.nan, assd=math.nan)
  overlap = (pred & truth).sum()
  cross = ndimage.generate_binary_structure(pred.ndim, 1)
  pred_surface, truth_surface = (
      mask ^ ndimage.binary_erosion(mask, cross) for mask in (pred, truth))
  pred_to_truth = ndimage.distance_transform_edt(
      ~truth_surface, sampling=spacing)[pred_surface]
  truth_to_pred = ndimage.distance_transform_edt(
      ~pred_surface, sampling=spacing)[truth_surface]
  pooled = np.concatenate([pred_to_truth, truth_to_pred])
  if mode == 'paper':
    hd95 = np.percentile(pooled, 95)
    assd = (pred_to_truth.mean() + truth_to_pred.mean()) / 2
  else:
    hd95 = max(np.percentile(pred_to_truth, 95),
               np.percentile(truth_to_pred, 95))
    assd = pooled.mean()
  return dict(dice=2 * overlap / (pred.sum() + truth.sum()),
              jaccard=overlap / (pred | truth).sum(), hd95=hd95, assd=assd)


@pytest.fixture(scope='module')
def oracle_class_maps(demo_model):
  model, variables = demo_model
  return _oracle_class_maps(model, variables,
                            _volume_cases(_config().dataset.num_classes))


@pytest.mark.parametrize('mode', ['paper', 'standard'])
def test_metrics_and_files_match_direct_computation(demo_model,
                                                    oracle_class_maps,
                                                    tmp_path, umask, mode):
  model, variables = demo_model
  config = _config(metric_mode=mode)
  num_classes = config.dataset.num_classes
  names = input_pipeline.generic_class_names(config.dataset.num_classes)
  cases = _volume_cases(num_classes)
  summary = evaluate.evaluate_cases(_context(config), variables, cases,
                                    split='test', out_dir=tmp_path, step=3)

  # Paper mode measures in voxels (the reference code passes no spacing).
  # expected[name][i, k]: case i, class k + 1.
  expected = {name: np.empty((len(cases), num_classes - 1))
              for name in metrics.METRIC_NAMES}
  for i, (case, pred) in enumerate(zip(cases, oracle_class_maps)):
    spacing = case.spacing if mode == 'standard' else None
    for k in range(1, num_classes):
      for name, value in _oracle_metrics(pred == k, case.label == k, spacing,
                                         mode).items():
        expected[name][i, k - 1] = value
  # The model predicts several classes, and some class is both predicted and
  # present, so the distances are exercised.
  assert np.isfinite(expected['hd95']).any() and (expected['hd95'] > 0).any()
  rows = _read_csv(tmp_path / evaluate.METRICS_FILE)
  assert len(rows) == len(cases) * (num_classes - 1)
  for row in rows:
    case_index = [c.case_id for c in cases].index(row['case_id'])
    k = int(row['class_id']) - 1
    assert row['class_name'] == names[k]
    for name in metrics.METRIC_NAMES:
      np.testing.assert_allclose(float(row[name]),
                                 expected[name][case_index, k], rtol=1e-12)

  # Mean over cases, then over classes, NaN entries left out.
  for name in metrics.METRIC_NAMES:
    valid = ~np.isnan(expected[name])
    per_class = [expected[name][valid[:, k], k].mean()
                 for k in range(num_classes - 1) if valid[:, k].any()]
    np.testing.assert_allclose(summary[f'mean_{name}'], np.mean(per_class),
                               rtol=1e-12)
    assert [summary['excluded'][name][n] for n in names] == list(
        (~valid).sum(axis=0))
  assert summary['num_cases'] == len(cases)
  assert summary['num_slices'] == sum(len(c.image) for c in cases)
  assert summary['mode'] == mode
  assert summary['distance_unit'] == ('mm' if mode == 'standard' else 'voxel')
  if mode == 'standard':
    # The absent last class has empty truth in every case: HD95 left out.
    assert summary['excluded']['hd95'][names[-1]] == len(cases)

  written = json.loads((tmp_path / evaluate.SUMMARY_FILE).read_text())
  assert written['num_cases'] == len(cases) and written['step'] == 3
  assert 'table' not in written
  table = (tmp_path / evaluate.TABLE_FILE).read_text()
  assert table.strip() == summary['table']
  body = table.strip().splitlines()[2:]
  assert [line.split()[0] for line in body] == [
      n.split()[0] for n in names] + ['mean']
  assert not list(tmp_path.glob('.*'))  # No temporary files left.
  outputs = [path for path in tmp_path.rglob('*') if path.is_file()]
  assert outputs and all(path.stat().st_mode & 0o777 == 0o666 & ~umask
                         for path in outputs)


@pytest.mark.parametrize('mode', ['paper', 'standard'])
def test_constant_prediction_gives_known_metrics(demo_model, mode):
  model, variables = demo_model
  config = _config(metric_mode=mode)
  num_classes = config.dataset.num_classes
  predicted_class = 1
  variables = predicting_constant(variables, predicted_class, num_classes)
  cases = _volume_cases(num_classes)
  summary = evaluate.evaluate_cases(_context(config), variables, cases,
                                    split='test')
  names = input_pipeline.generic_class_names(config.dataset.num_classes)
  # Class 1 fills every volume: Dice = 2|T| / (|volume| + |T|).
  dice = [2 * (c.label == predicted_class).sum()
          / (c.label.size + (c.label == predicted_class).sum()) for c in cases]
  np.testing.assert_allclose(
      summary['per_class']['dice'][names[predicted_class - 1]], np.mean(dice))
  for k in range(predicted_class + 1, num_classes):
    name = names[k - 1]
    present = sum((c.label == k).any() for c in cases)
    if mode == 'paper':  # Empty prediction: Dice 0 and HD95 0.
      assert summary['per_class']['dice'][name] == 0.0
      assert summary['per_class']['hd95'][name] == 0.0
      assert summary['excluded']['hd95'][name] == 0
    else:  # Truth present: Dice 0, HD95 NaN; both empty: all NaN.
      assert summary['excluded']['hd95'][name] == len(cases)
      assert summary['excluded']['dice'][name] == len(cases) - present
      if present:
        assert summary['per_class']['dice'][name] == 0.0
      assert math.isnan(summary['per_class']['hd95'][name])
  assert summary['distance_unit'] == ('voxel' if mode == 'paper' else 'mm')


def test_2d_binary_set_scores_at_image_size(tmp_path):
  config = _config('glas')
  config.eval.overlay_cases = ('image_1',)
  model = create_model(config.model)
  assert config.model.num_classes == 1
  variables = predicting_constant(
      numpy_variables(model, IMAGE_SIZE, config.dataset.in_channels), 1, 1)
  rng = np.random.default_rng(0)
  cases = []
  for i, (height, width) in enumerate(IMAGES_2D):
    label = np.zeros((1, height, width), np.uint8)
    label[0, height // 4:height // 2, width // 3:] = 1
    cases.append(input_pipeline.Case(
        f'image_{i}', rng.random((1, height, width, 3), dtype=np.float32),
        label, (1.0, 1.0, 1.0)))
  summary = evaluate.evaluate_cases(_context(config), variables, cases,
                                    split='test',                                     out_dir=tmp_path)
  # All foreground at IMAGE_SIZE: Dice = 2|T| / (S^2 + |T|), IoU = |T| / S^2.
  sizes = [inference.resize_labels(c.label[0], (IMAGE_SIZE,) * 2).sum()
           for c in cases]
  pixels = IMAGE_SIZE**2
  np.testing.assert_allclose(summary['mean_dice'],
                             np.mean([2 * t / (pixels + t) for t in sizes]))
  np.testing.assert_allclose(summary['mean_jaccard'],
                             np.mean([t / pixels for t in sizes]))
  assert summary['distance_unit'] == 'pixel'
  assert 'IoU (%)' in summary['table']
  assert len(_read_csv(tmp_path / evaluate.METRICS_FILE)) == len(cases)
  # At the image's own size, not the square it was scored at.
  overlay = Image.open(tmp_path / evaluate.OVERLAYS_DIR / 'image_1.png')
  height, width = IMAGES_2D[1]
  assert overlay.size == (3 * width, height)


def test_overlays_fill_each_class_in_its_translucent_colour():
  """Truth and prediction panels: class pixels are half image, half class
  colour (filled, not outlined), other pixels the image's own grey."""
  depth, height, width = 2, 20, 30
  grey = np.linspace(0, 1, height * width, dtype=np.float32).reshape(
      1, height, width, 1).repeat(depth, axis=0)
  truth = np.zeros((depth, height, width), np.uint8)
  truth[1, 4:12, 5:20] = 2
  prediction = np.zeros_like(truth)
  prediction[1, 10:16, 2:9] = 3
  case = evaluate.PredictedCase('case', grey, prediction, truth,
                                (1.0, 1.0, 1.0))
  rgb = evaluate.render_overlay(case).astype(np.float64) / 255
  assert rgb.shape == (height, 3 * width, 3)
  image = np.repeat(grey[1], 3, axis=-1)  # slice 1: the labelled one
  for panel, labels in enumerate((truth[1], prediction[1])):
    shown = rgb[:, (panel + 1) * width:(panel + 2) * width]
    expected = np.where((labels > 0)[..., None],
                        0.5 * image + 0.5 * visualize.PALETTE[labels], image)
    np.testing.assert_allclose(shown, expected, atol=1 / 255)
  np.testing.assert_allclose(rgb[:, :width], image, atol=1 / 255)


def test_nifti_predictions_and_overlays(demo_model, tmp_path):
  model, variables = demo_model
  config = _config()
  config.eval.save_predictions = True
  config.eval.overlay_cases = (CASES[1][0],)
  cases = _volume_cases(config.dataset.num_classes)
  evaluate.evaluate_cases(_context(config), variables, cases, split='test',
                          out_dir=tmp_path)
  predict_fn = inference.make_predict_fn(model, make_mesh())
  for case in cases:
    saved = nib.load(tmp_path / evaluate.PREDICTIONS_DIR
                     / f'{case.case_id}.nii.gz')
    prediction = inference.predict_volume(predict_fn, variables, case.image,
                                          IMAGE_SIZE, BATCH_SIZE)
    np.testing.assert_array_equal(np.asarray(saved.dataobj),
                                  prediction.transpose(2, 1, 0))
    np.testing.assert_allclose(np.diag(saved.affine)[:3],
                               case.spacing[::-1], rtol=1e-6)
  depth, height, width = CASES[1][1]
  overlay = Image.open(tmp_path / evaluate.OVERLAYS_DIR
                       / f'{CASES[1][0]}.png')
  assert overlay.size == (3 * width, height) and overlay.mode == 'RGB'
  assert not (tmp_path / evaluate.OVERLAYS_DIR / f'{CASES[0][0]}.png').exists()


def test_bad_config_is_refused_before_evaluating(demo_model):
  _, variables = demo_model
  config = _config()
  config.model.num_classes = config.dataset.num_classes + 1
  with pytest.raises(ValueError, match='config.model.num_classes'):
    _context(config)
  config = _config()
  config.eval.metric_mode = 'medpy'
  with pytest.raises(ValueError, match='config.eval.metric_mode'):
    _context(config)
  with pytest.raises(ValueError, match='has no cases'):
    evaluate.evaluate_cases(_context(_config()), variables, [])


def test_evaluate_checkpoint_end_to_end(demo_model, tmp_path):
  model, variables = demo_model
  data_dir = tmp_path / 'tfds'
  build.build_dataset('demo', data_dir=data_dir, **DEMO_OPTIONS)
  config = _config()
  config.dataset.data_dir = str(data_dir)
  workdir = tmp_path / 'run'
  checkpoints.write_variables(workdir, jax.tree.map(np.asarray, variables),
                              config, step=CHECKPOINT_STEP)

  # The command's config has another model width than the checkpoint: the
  # checkpoint's own model is evaluated.
  command = _config()
  command.dataset.data_dir = str(data_dir)
  command.model.widths = tuple(2 * w for w in config.model.widths)
  command.batch_size = config.batch_size // 3
  ctx = context.create(command, 'eval', workdir=workdir)
  summary = evaluate.evaluate_checkpoint(ctx, workdir, which='latest')
  out_dir = workdir / evaluate.EVAL_DIR / f'test_step{CHECKPOINT_STEP}'
  assert summary['step'] == CHECKPOINT_STEP
  assert summary['num_cases'] == DEMO_OPTIONS['num_test_cases']
  rows = _read_csv(out_dir / evaluate.METRICS_FILE)
  assert len(rows) == summary['num_cases'] * (config.dataset.num_classes - 1)
  saved = json.loads((out_dir / evaluate.SUMMARY_FILE).read_text())
  assert saved['mean_dice'] == pytest.approx(summary['mean_dice'])
  # The run's protocol and epochs: train slices in batches of the run's own
  # batch size (the checkpoint's config), not the command's.
  train_slices = tfds.builder_from_directory(
      str(data_dir / config.dataset.name / '1.0.0')).info.splits[
          'train'].num_examples
  epoch_steps = math.ceil(train_slices / config.batch_size)
  assert {key: saved[key] for key in ('checkpoint', 'protocol', 'train_slices',
                                      'steps_per_epoch', 'epoch')} == dict(
      checkpoint='latest', protocol='validated', train_slices=train_slices,
      steps_per_epoch=epoch_steps, epoch=CHECKPOINT_STEP / epoch_steps)
  # The test metrics in TensorBoard at the evaluated step.
  events = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  logged = {event.step: float(tensor_util.make_ndarray(event.tensor_proto))
            for event in events.Tensors('test/mean_dice')}
  assert logged == {CHECKPOINT_STEP: pytest.approx(summary['mean_dice'])}

  # A model field set on the command line must match the checkpoint's.
  with pytest.raises(cli.UserError) as error:
    context.create(command, 'eval', workdir=workdir,
                   overridden={'model.widths'})
  assert str(error.value) == (
      f'--config.model.widths={command.model.widths!r} differs from the '
      f'model the checkpoints in {workdir} were saved with (widths='
      f'{tuple(config.model.widths)!r}); drop the override to use that '
      'model.')

  # The restored variables score like the in-memory ones.
  data_context = context.create(config, 'eval')
  direct = evaluate.evaluate_split(data_context, variables, 'test')
  for name in metrics.METRIC_NAMES:
    np.testing.assert_equal(direct[f'mean_{name}'], summary[f'mean_{name}'])

  with pytest.raises(ValueError, match="no split 'nope'"):
    evaluate.evaluate_split(data_context, variables, 'nope')
