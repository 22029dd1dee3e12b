"""Grad-CAM and channel similarity of the feature taps."""

import functools
import io
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

import tiny_configs
import tiny_train_config
from selfreg_jax.common import cli
from selfreg_jax.core import checkpoints
from selfreg_jax.core import context
from selfreg_jax.core import input_pipeline
from selfreg_jax.core.models import create_model
from selfreg_jax.tools import analysis

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = tiny_configs.IMAGE_SIZES[0]
CLASSES = (1, 2)
TRAIN_CONFIG = tiny_train_config.get_config('unet')


def _model_and_variables(model_config, shapes_only=False):
  """The model, its variables (ShapeDtypeStructs if shapes_only), an image."""
  model = create_model(model_config)
  image = jax.random.normal(jax.random.key(1), (1, SIZE, SIZE, 1))
  init = (functools.partial(jax.eval_shape, model.init) if shapes_only
          else jax.jit(model.init))
  return model, init(jax.random.key(0), image), image


@pytest.fixture(scope='module')
def unet_gradients():
  """Variables of a randomly initialised tiny UNet and {class: (score, taps,
  gradients)} of an image. The model is that of the tiny training config, so
  its program is compiled once for this fixture and the whole-case test."""
  model, variables, image = _model_and_variables(TRAIN_CONFIG.model)
  return variables, {k: analysis.tap_gradients(model, variables, image, k)
                     for k in CLASSES}


@pytest.mark.parametrize('model_config', [tiny_configs.tiny_unet(),
                                          tiny_configs.tiny_swin(SIZE)])
def test_every_tap_is_located_at_a_distinct_module_output(model_config):
  model, variables, image = _model_and_variables(model_config,
                                                 shapes_only=True)
  located = analysis.locate_taps(model, variables, image)
  _, features = jax.eval_shape(model.apply, variables, image)
  assert list(located) == list(analysis.named_taps(features))
  assert len(set(located.values())) == len(located)


def test_gradcam_has_the_tap_size_is_non_negative_and_depends_on_class(
    unet_gradients):
  _, gradients = unet_gradients
  _, taps, grads = gradients[CLASSES[0]]
  _, _, other_grads = gradients[CLASSES[1]]
  cams = {}
  for name, tap in taps.items():
    cam = np.asarray(analysis.grad_cam(tap, grads[name]))
    assert cam.shape == tap.shape[:2], name
    assert (cam >= 0).all() and np.isfinite(cam).all(), name
    assert not np.allclose(grads[name], other_grads[name]), name
    cams[name] = (cam, np.asarray(analysis.grad_cam(tap, other_grads[name])))
  assert sum(not np.allclose(a, b) for a, b in cams.values()) >= len(cams) // 2
  assert not np.allclose(*cams['final'])


def test_gradient_of_the_last_tap_is_the_output_kernel_on_the_region(
    unet_gradients):
  """The logits are a 1x1 conv of `final`, so dS/d(final) is the class's
  kernel column on the predicted region (whole image if empty)."""
  variables, gradients = unet_gradients
  score, taps, grads = gradients[CLASSES[0]]
  outc = variables['params']['outc']
  logits = taps['final'] @ outc['kernel'][0, 0] + outc['bias']
  assert float(score) == pytest.approx(
      float(analysis.class_score(logits, CLASSES[0])), rel=1e-5)
  region = np.array(jnp.argmax(logits, -1) == CLASSES[0])
  if not region.any():
    region[:] = True
  expected = region[..., None] * np.asarray(outc['kernel'][0, 0, :, CLASSES[0]])
  np.testing.assert_allclose(grads['final'], expected, atol=1e-6)


def test_grad_cam_formula_on_a_hand_made_tap():
  activation = jnp.stack([jnp.ones((2, 3)), jnp.arange(6.).reshape(2, 3)], -1)
  gradient = jnp.stack([jnp.full((2, 3), -1.0), jnp.full((2, 3), 0.5)], -1)
  expected = np.maximum(-1.0 + 0.5 * np.arange(6.).reshape(2, 3), 0)
  np.testing.assert_allclose(analysis.grad_cam(activation, gradient), expected)


def test_similarity_is_symmetric_with_unit_diagonal(unet_gradients):
  _, taps, _ = unet_gradients[1][CLASSES[0]]
  for name, tap in taps.items():
    matrix = np.asarray(analysis.channel_similarity(tap))
    assert matrix.shape == (tap.shape[-1],) * 2, name
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    assert (np.abs(matrix) <= 1 + 1e-5).all()


def test_similarity_values_of_known_channels():
  base = jnp.arange(1.0, 5.0).reshape(2, 2)
  # Channels: base, 2*base (cosine 1), -base (cosine -1), zero (cosine 0).
  tap = jnp.stack([base, 2 * base, -base, jnp.zeros((2, 2))], -1)
  matrix = np.asarray(analysis.channel_similarity(tap))
  expected = np.array([[1, 1, -1, 0], [1, 1, -1, 0], [-1, -1, 1, 0],
                       [0, 0, 0, 1]], np.float32)
  np.testing.assert_allclose(matrix, expected, atol=1e-6)
  assert analysis.mean_off_diagonal(matrix) == pytest.approx(-2 / 12)


def test_analyze_case_writes_figures_json_and_tensorboard(tiny_demo_data_dir,
                                                          tmp_path):
  config = TRAIN_CONFIG.copy_and_resolve_references()
  config.dataset.data_dir = str(tiny_demo_data_dir)
  model, variables, _ = _model_and_variables(config.model)
  checkpoints.write_variables(tmp_path, variables, config, step=3)
  ctx = context.create(config, 'eval', workdir=tmp_path)
  case = next(input_pipeline.iterate_cases(ctx.data, 'test'))
  out_dir = analysis.analyze_case(ctx, tmp_path, case.case_id, CLASSES[0],
                                  split='test', which='latest')
  numbers = json.loads((out_dir / 'analysis.json').read_text())
  assert numbers['step'] == 3 and numbers['case_id'] == case.case_id
  assert numbers['slice_index'] == analysis.pick_slice(case.label, CLASSES[0])
  assert set(numbers['taps']) == set(analysis.named_taps(
      jax.eval_shape(model.apply, variables,
                     jnp.zeros((1, SIZE, SIZE, 1)))[1]))
  for tap in numbers['taps'].values():
    assert -1 <= tap['mean_offdiag_similarity'] <= 1
  maps = np.load(out_dir / 'maps.npz')
  assert maps['gradcam/final'].shape == (SIZE, SIZE)
  for name in ('gradcam.png', 'similarity.png'):
    image = np.asarray(Image.open(out_dir / name))
    assert image.ndim == 3 and image.std() > 0
  events = event_accumulator.EventAccumulator(
      str(tmp_path / analysis.ANALYSIS_DIR),
      size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  tags = events.Tags()['tensors']
  prefix = f'test/{case.case_id}/class{CLASSES[0]}'
  assert f'{prefix}/gradcam' in tags and f'{prefix}/similarity' in tags
  assert f'{prefix}/offdiag_similarity/final' in tags
  assert not list(out_dir.glob('.*'))
  with pytest.raises(ValueError, match="'no_such_case'.*'test'"):
    analysis.analyze_case(ctx, tmp_path, 'no_such_case', CLASSES[0],
                          split='test', which='latest')
  with pytest.raises(ValueError, match='--class=9'):
    analysis.analyze_case(ctx, tmp_path, case.case_id, 9)


def _start_analysis_cli(workdir, data_dir, case_id,
                        *overrides) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-m', 'selfreg_jax.tools.analysis',
       f'--config={ROOT / "tests" / "tiny_train_config.py"}:unet',
       f'--workdir={workdir}', f'--case={case_id}', '--checkpoint=latest',
       f'--config.dataset.data_dir={data_dir}', *overrides],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_analyses_the_checkpoints_model_quietly_and_refuses_other_widths(
    tiny_demo_data_dir, tmp_path):
  """The run was trained narrower than its config file says: the analysis
  uses the checkpoint's model without being told, prints no library INFO
  lines (orbax's included), and refuses a width set on the command line
  that differs from the checkpoint's in one line."""
  config = TRAIN_CONFIG.copy_and_resolve_references()
  config.dataset.data_dir = str(tiny_demo_data_dir)
  config.model.widths = tuple(w // 2 for w in config.model.widths)
  _, variables, _ = _model_and_variables(config.model)
  checkpoints.write_variables(tmp_path, variables, config, step=3)
  case_id = next(input_pipeline.iterate_cases(
      input_pipeline.DataSet.open(config.dataset), 'test')).case_id

  # Both commands side by side (the refused one writes nothing): their
  # start-ups overlap.
  file_widths = TRAIN_CONFIG.model.widths
  analysed = _start_analysis_cli(tmp_path, tiny_demo_data_dir, case_id)
  refused = _start_analysis_cli(tmp_path, tiny_demo_data_dir, case_id,
                                f'--config.model.widths={file_widths}')
  stderr = analysed.communicate(timeout=600)[1]
  refused_stderr = refused.communicate(timeout=600)[1]
  assert analysed.returncode == 0, stderr[-3000:]
  assert (tmp_path / analysis.ANALYSIS_DIR /
          f'test_{case_id}_class1_step3' / 'analysis.json').is_file()
  for line in stderr.splitlines():
    assert 'orbax' not in line and '[process=' not in line, line
  assert any('Analysis of' in line for line in stderr.splitlines())

  assert refused.returncode == cli.EXIT_USER_ERROR
  assert refused_stderr.splitlines() == [
      f'error: --config.model.widths={tuple(file_widths)!r} differs from the '
      f'model the checkpoints in {tmp_path} were saved with (widths='
      f'{config.model.widths!r}); drop the override to use that model.']


def test_gradcam_figure_keeps_the_image_aspect():
  """A wide image gives panels three times as wide as high, not squares."""
  height, width = 20, 60
  image = np.random.default_rng(0).random((height, width, 1), np.float32)
  truth = np.zeros((height, width), bool)
  truth[5:15, 10:40] = True
  shapes = {}
  sizes = {'wide': (height, width), 'square': (width, width)}
  for name, (h, w) in sizes.items():
    png = analysis.gradcam_figure(
        np.resize(image, (h, w, 1)), np.resize(truth, (h, w)), 1,
        {'final': np.ones((h, w), np.float32)}, 'title')
    shapes[name] = np.asarray(Image.open(io.BytesIO(png))).shape
  wide_h, wide_w, _ = shapes['wide']
  square_h, square_w, _ = shapes['square']
  assert wide_w == pytest.approx(square_w, rel=0.05)
  # Two panels of 1 x 1/3 (plus titles) against two of 1 x 1.
  assert wide_h < 0.6 * square_h
