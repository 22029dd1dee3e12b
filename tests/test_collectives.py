"""What the sharded train step communicates, read from its compiled HLO."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_train_config
from selfreg_jax.common import distributed
from selfreg_jax.core.models import create_model
from selfreg_jax.tools import collectives

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / 'tests' / 'tiny_train_config.py'
PROCESSES, DEVICES_PER_PROCESS = 2, 4
F32 = 4  # bytes

HLO = """HloModule step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main {
  %fusion = f32[8]{0} fusion(%p), kind=kLoop, calls=%all-reduce-like, metadata={op_name="jit(step)/not all-reduce(x)"}
  %all-reduce.7 = (f32[3,3,4,8]{3,2,1,0}, f32[8]{0}, /*index=2*/f32[]) all-reduce(%a, %b, %c), channel_id=1, replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(step)/(conv:norm)"}
  %all-gather.1 = bf16[16,2]{1,0} all-gather(%x), channel_id=2, replica_groups=[1,2]<=[2], dimensions={0}
  %all-reduce-start = f32[10]{0} all-reduce-start(%y), channel_id=3, to_apply=%add
  %all-reduce-done = f32[10]{0} all-reduce-done(%all-reduce-start)
  ROOT %collective-permute = u32[2]{0} collective-permute(%z), source_target_pairs={{0,1},{1,0}}
}
"""


def test_parse_reads_every_array_of_combined_and_async_collectives():
  found = collectives.parse(HLO)
  assert [(c.kind, c.bytes) for c in found] == [
      ('all-reduce', (3 * 3 * 4 * 8 + 8 + 1) * F32),
      ('all-gather', 16 * 2 * 2),
      ('all-reduce', 10 * F32),
      ('collective-permute', 2 * 4)]
  assert found[0].arrays == (collectives.Array('f32', (3, 3, 4, 8)),
                             collectives.Array('f32', (8,)),
                             collectives.Array('f32', ()))
  assert found[0].op_name == 'jit(step)/(conv:norm)'
  totals = collectives.totals(found)
  assert totals['all-reduce'] == {'instructions': 2, 'arrays': 4,
                                  'bytes': (288 + 8 + 1 + 10) * F32}
  assert totals['all-to-all'] == {'instructions': 0, 'arrays': 0, 'bytes': 0}


def _nbytes(leaves) -> int:
  return sum(int(np.prod(leaf.shape)) * F32 for leaf in leaves)


def _relative_bias_excess(params) -> int:
  """Bytes by which the all-reduced Swin position-bias gradients exceed
  their tables: a table ((2w - 1)**2, heads) indexed into a (heads, N, N)
  bias (N = w**2 tokens per window) gets its gradient summed over the batch,
  and so all-reduced, at the bias's size, before the scatter onto the
  table."""
  excess = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if 'relative_position_bias_table' in jax.tree_util.keystr(path):
      entries, heads = leaf.shape
      window = (int(round(np.sqrt(entries))) + 1) // 2
      excess += (heads * window ** 4 - entries * heads) * F32
  return excess


@pytest.mark.parametrize('model_name', ['unet', 'swin_unet'])
def test_sharded_step_all_reduces_gradients_and_statistics_only(model_name,
                                                                tmp_path):
  """The tiny step of tiny_train_config, compiled over 2 processes x 4 CPU
  devices, communicates as data parallelism must:

  - no collective but all-reduces (no all-gather, reduce-scatter, all-to-all
    or collective-permute of activations, parameters or random bits), all
    of float32 arrays;
  - the all-reduced bytes are the gradients' (the parameters' bytes, Swin's
    position-bias tables counted at their gathered size:
    `_relative_bias_excess`) plus a rest of at least the two statistics
    (mean, mean square) of every BatchNorm channel (global batch statistics)
    and at most 4 floats per BatchNorm channel (those and their gradients),
    1 per SelfReg tap channel (IFD's channel scores), 8 per class (Dice's
    sums and their gradients) and 32 scalar loss terms.
  """
  out = tmp_path / 'record.json'
  # GLIBC_TUNABLES set: no restart with huge pages, which speed up steps, not
  # compiles.
  results = distributed.launch_local(
      ['-m', 'selfreg_jax.tools.collectives', f'--config={CONFIG_FILE}:{model_name}',
       f'--out={out}'],
      num_processes=PROCESSES, devices_per_process=DEVICES_PER_PROCESS,
      timeout=600, cwd=ROOT, env=dict(os.environ, GLIBC_TUNABLES=''))
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads(out.read_text())

  config = tiny_train_config.get_config(model_name)
  size = config.dataset.image_size
  images = jnp.zeros((config.batch_size, size, size, 1))
  model = create_model(config.model)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False))
  (logits, features), _ = jax.eval_shape(
      lambda v: model.apply(v, images, train=True,
                            rngs={'dropout': jax.random.key(0)},
                            mutable=['batch_stats']), variables)
  param_bytes = _nbytes(jax.tree.leaves(variables['params']))
  gradient_bytes = param_bytes + _relative_bias_excess(variables['params'])
  bn_channels = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(
      variables.get('batch_stats', {}))) // 2  # a mean and a var each
  tap_channels = sum(tap.shape[-1] for tap in jax.tree.leaves(features))

  assert (record['processes'], record['devices']) == (
      PROCESSES, PROCESSES * DEVICES_PER_PROCESS)
  assert {kind for kind, counts in record['kinds'].items()
          if counts['instructions']} == {'all-reduce'}
  assert record['all_reduce']['element_types'] == ['f32']
  rest = record['kinds']['all-reduce']['bytes'] - gradient_bytes
  assert 2 * bn_channels * F32 <= rest <= F32 * (
      4 * bn_channels + tap_channels + 8 * logits.shape[-1] + 32)
  assert (record['param_bytes'], record['gradient_bytes']) == (
      param_bytes, gradient_bytes)
