"""The SelfReg loss against golden values of the paper's public PyTorch code.

`../shared/fixtures/selfreg_reference.npz` (README beside it) holds small
random channels-last maps for a UNet-shaped and a Swin-shaped tap set, and
what the public code computed on them: IFD per map, every SCR call with the
channel draws it used, the total at lambda = 1 and its gradient w.r.t. every
map. The fixture is part of the workspace: a missing file fails these tests.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfreg_jax.core import losses
from selfreg_jax.core.models import Features

FIXTURE = (pathlib.Path(__file__).resolve().parents[2] / 'shared' /
           'fixtures' / 'selfreg_reference.npz')
KINDS = ('unet', 'swin')


@pytest.fixture(scope='module')
def reference():
  if not FIXTURE.is_file():
    pytest.fail(f'golden fixture {FIXTURE} is missing: it is part of the '
                'workspace (../shared/fixtures), restore it.')
  with np.load(FIXTURE) as archive:
    arrays = {name: archive[name] for name in archive.files}
  return arrays, json.loads(str(arrays.pop('meta_json')))


def tap_names(kind):
  """Fixture map names per Features field (group 'last' / 'first' blocks)."""
  if kind == 'unet':
    return {'encoder': [f'enc{s}' for s in range(4)],
            'decoder': [f'dec{s}' for s in range(3)]}
  return {'encoder': [f'enc{s}_block1' for s in range(4)],
          'decoder': [f'dec{s}_block1' for s in range(3)],
          'encoder_first': [f'enc{s}_block0' for s in range(4)],
          'decoder_first': [f'dec{s}_block0' for s in range(3)]}


def features_of(arrays, kind) -> Features:
  maps = {field: tuple(jnp.asarray(arrays[f'{kind}/{name}']) for name in names)
          for field, names in tap_names(kind).items()}
  return Features(final=jnp.asarray(arrays[f'{kind}/final']), **maps)


def recorded_draws(meta, kind):
  """The reference's channel draws, in `losses.draw_channels`' layout."""
  by_map = {call['map']: losses.ChannelDraw(
      student=jnp.asarray(call['idx_s']), teacher=jnp.asarray(call['idx_t']))
            for call in meta[kind]['scr_calls']}
  names = tap_names(kind)
  groups = [('encoder', 'decoder')]
  if kind == 'swin':
    groups.append(('encoder_first', 'decoder_first'))
  return tuple(tuple(by_map[name] for name in names[enc] + names[dec])
               for enc, dec in groups)


@pytest.mark.parametrize('kind', KINDS)
def test_ifd_of_every_map_matches_reference(reference, kind):
  arrays, meta = reference
  expected = meta[kind]['ifd']
  assert sorted(expected) == sorted(meta[kind]['map_order'])
  for name, value in expected.items():
    np.testing.assert_allclose(
        losses.ifd_loss(jnp.asarray(arrays[f'{kind}/{name}'])), value,
        rtol=1e-5, err_msg=f'{kind}/{name}')


@pytest.mark.parametrize('kind', KINDS)
def test_every_scr_call_matches_reference(reference, kind):
  arrays, meta = reference
  final = jnp.asarray(arrays[f'{kind}/final'])
  for call in meta[kind]['scr_calls']:
    draw = losses.ChannelDraw(student=jnp.asarray(call['idx_s']),
                              teacher=jnp.asarray(call['idx_t']))
    np.testing.assert_allclose(
        losses.scr_loss(jnp.asarray(arrays[f'{kind}/{call["map"]}']), final,
                        draw),
        call['value'], rtol=1e-5, err_msg=f'{kind}/{call["map"]}')


@pytest.mark.parametrize('kind', KINDS)
def test_selfreg_total_and_gradients_match_reference(reference, kind):
  arrays, meta = reference
  features = features_of(arrays, kind)
  draws = recorded_draws(meta, kind)

  def total(features):
    terms = losses.selfreg_loss(features, draws=draws)
    return terms.scr + terms.ifd

  value, grads = jax.value_and_grad(total)(features)
  np.testing.assert_allclose(value, arrays[f'{kind}/total'], rtol=1e-5)
  np.testing.assert_allclose(value, meta[kind]['total'], rtol=1e-5)
  for field, names in tap_names(kind).items():
    for name, grad in zip(names, getattr(grads, field), strict=True):
      np.testing.assert_allclose(grad, arrays[f'{kind}/grad_{name}'],
                                 rtol=1e-4, atol=1e-7,
                                 err_msg=f'{kind}/grad_{name}')
  np.testing.assert_allclose(grads.final, arrays[f'{kind}/grad_final'],
                             atol=0)


def test_key_driven_draws_have_the_reference_layout(reference):
  """The default path draws as many channels per tap as the reference did."""
  arrays, meta = reference
  for kind in KINDS:
    features = features_of(arrays, kind)
    drawn = losses.draw_channels(jax.random.key(0), features)
    recorded = recorded_draws(meta, kind)
    assert jax.tree.map(jnp.shape, drawn) == jax.tree.map(jnp.shape, recorded)
    for draw, tap in zip(sum(drawn, ()), sum(
        (enc + dec for enc, dec in features.tap_groups()), ())):
      assert len(set(np.asarray(draw.student).tolist())) == len(draw.student)
      assert np.asarray(draw.student).max() < tap.shape[-1]
      assert np.asarray(draw.teacher).max() < features.final.shape[-1]
