"""What the data-parallel train step communicates, read from its compiled HLO.

  python -m selfreg_jax.tools.collectives --config configs/synapse_swin.py \
      [--config.batch_size=64 --config.eval.batch_size=64] [--out FILE.json]

compiles the config's train step (`train.jit_train_step`, as the training
loop does, at the config's global batch) over all devices of all processes,
without running it, and prints (and writes to --out, from process 0) what
its collectives move per step: `describe`. To see a pod's program on one
CPU, give the process N CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N), or start it as several
processes with `distributed.launch_local` (docs/scaling.md).

`parse(compiled.as_text())` lists every cross-device collective instruction
of an optimised HLO module with the arrays it moves. XLA combines small
all-reduces into tuple-shaped ones (`(f32[64], f32[3,3,64,64], ...)
all-reduce(...)`), so an instruction holds one array per combined operand.
Asynchronous forms (`all-reduce-start` / `-done` on GPU and TPU) are counted
once, by their start; XLA:CPU emits only synchronous ones.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from selfreg_jax.common import runtime

if __name__ == '__main__':
  # The process settings of main.py (they change XLA:CPU's program), before
  # JAX starts its backends.
  runtime.prepare_process()

import collections
import dataclasses
import functools
import math
import re
import time
from typing import Any, Iterable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from selfreg_jax import train
from selfreg_jax.common import cli
from selfreg_jax.common import distributed
from selfreg_jax.common import files
from selfreg_jax.core import context
from selfreg_jax.core import sharding

ALL_REDUCE = 'all-reduce'
KINDS = (ALL_REDUCE, 'all-gather', 'reduce-scatter', 'all-to-all',
         'ragged-all-to-all', 'collective-permute', 'collective-broadcast')
# HLO element types -> bytes per element (predicates take a byte).
ELEMENT_BYTES = {
    'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1,
    'f8e5m2': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}

# `%name = TYPE kind(` or `kind-start(`, TYPE an array type (`f32[3,64]{1,0}`,
# layouts may hold parentheses: `{1,0:T(8,128)}`) or a tuple of them.
_ARRAY_TYPE = r'[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?'
_TUPLE_TYPE = r'\((?:[^()]|\([^()]*\))*\)'
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*'
    rf'(?P<type>{_TUPLE_TYPE}|{_ARRAY_TYPE})\s+'
    r'(?P<kind>' + '|'.join(sorted(map(re.escape, KINDS), key=len,
                                   reverse=True)) + r')(?:-start)?\(')
_ARRAY = re.compile(r'\b(?P<dtype>[a-z]+[0-9]*[a-z0-9]*)\[(?P<dims>[0-9,]*)\]')
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')


@dataclasses.dataclass(frozen=True)
class Array:
  """One array a collective moves: HLO element type and dimensions."""
  dtype: str
  shape: tuple[int, ...]

  @property
  def bytes(self) -> int:
    return ELEMENT_BYTES[self.dtype] * int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction.

  Attributes:
    kind: one of KINDS.
    arrays: the arrays of its result, one per combined operand (for an
      all-reduce these are its operands: what every device contributes and
      receives).
    op_name: the JAX operation(s) it came from (XLA's metadata; combined
      instructions list theirs joined by ':').
  """
  kind: str
  arrays: tuple[Array, ...]
  op_name: str

  @property
  def bytes(self) -> int:
    return sum(array.bytes for array in self.arrays)


def parse(hlo_text: str) -> list[Collective]:
  """Every collective instruction of an HLO module's text, in text order."""
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    arrays = tuple(
        Array(m['dtype'], tuple(int(d) for d in m['dims'].split(',') if d))
        for m in _ARRAY.finditer(match['type']))
    unknown = {array.dtype for array in arrays} - ELEMENT_BYTES.keys()
    if not arrays or unknown:
      raise ValueError(f'Cannot read the arrays of this HLO instruction '
                       f'(element types {sorted(unknown)}): {line.strip()}')
    op_name = _OP_NAME.search(line)
    found.append(Collective(match['kind'], arrays,
                            op_name['name'] if op_name else ''))
  return found


def totals(collectives: Iterable[Collective]) -> dict[str, dict[str, int]]:
  """{kind: {'instructions': n, 'arrays': n, 'bytes': n}} for every kind in
  KINDS (zeros where absent)."""
  result = {kind: collections.Counter(instructions=0, arrays=0, bytes=0)
            for kind in KINDS}
  for collective in collectives:
    result[collective.kind].update(instructions=1,
                                   arrays=len(collective.arrays),
                                   bytes=collective.bytes)
  return {kind: dict(counts) for kind, counts in result.items()}


RELATIVE_BIAS_TABLE = 'relative_position_bias_table'


def _nbytes(leaf) -> int:
  return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def gradient_bytes(params: Any) -> int:
  """Bytes the all-reduce of the gradient of `params` moves per step.

  Each parameter's own bytes, except for the Swin-UNet's relative-position
  bias tables: a table ((2w - 1)**2, heads) is indexed into a (heads, N, N)
  bias (N = w**2 tokens per window), so its gradient is the bias's gradient
  summed over the batch, then scattered onto the table. The sum over the
  batch is where the devices' parts meet: XLA all-reduces the (heads, N, N)
  sum, 14x the table's bytes at w = 7.
  """
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if RELATIVE_BIAS_TABLE in jax.tree_util.keystr(path):
      entries, heads = leaf.shape
      window = (math.isqrt(entries) + 1) // 2
      total += heads * window ** 4 * jnp.dtype(leaf.dtype).itemsize
    else:
      total += _nbytes(leaf)
  return total


def describe(hlo_text: str, params: Any, batch_stats: Any) -> dict[str, Any]:
  """The collectives of a train step's HLO, next to what they must move.

  A data-parallel step must all-reduce the gradient of every parameter
  (`gradient_bytes`) and, for BatchNorm over the global batch, the batch
  statistics of every BatchNorm channel; the rest it may reduce is the loss
  terms' sums (scalars, per-class and per-channel vectors).

  Returns:
    kinds: `totals` of the collectives (instructions, arrays, bytes per kind).
    all_reduce: element_types and largest_array (dtype and shape) of the
      all-reduced arrays, and per all-reduce instruction (in text order) its
      arrays, bytes and pass: 'backward' where XLA's metadata names JAX's
      transposition (autodiff's backward pass), else 'forward'.
    param_bytes: the parameters' bytes.
    gradient_bytes: `gradient_bytes(params)`.
    other_all_reduce_bytes: all-reduced bytes beyond gradient_bytes (the
      statistics and the loss terms' sums).
    batch_stats_bytes: bytes of the BatchNorm running statistics (a mean and
      a variance per channel).
  """
  found = parse(hlo_text)
  kinds = totals(found)
  reduces = [c for c in found if c.kind == ALL_REDUCE]
  arrays = [a for c in reduces for a in c.arrays]
  largest = max(arrays, key=lambda a: a.bytes, default=None)
  gradients = gradient_bytes(params)
  return {
      'kinds': kinds,
      'all_reduce': {
          'element_types': sorted({a.dtype for a in arrays}),
          'largest_array': (None if largest is None
                            else [largest.dtype, list(largest.shape)]),
          'instructions': [
              {'arrays': len(c.arrays), 'bytes': c.bytes,
               'pass': 'backward' if 'transpose(' in c.op_name else 'forward'}
              for c in reduces]},
      'param_bytes': sum(map(_nbytes, jax.tree.leaves(params))),
      'gradient_bytes': gradients,
      'other_all_reduce_bytes': kinds[ALL_REDUCE]['bytes'] - gradients,
      'batch_stats_bytes': sum(map(_nbytes, jax.tree.leaves(batch_stats))),
  }


def compile_train_step(ctx: context.RunContext
                       ) -> tuple[Any, train.TrainState, float]:
  """Compiles the training loop's step of a run context over its mesh.

  Nothing is computed or allocated: the state and the batch are abstract.
  The learning-rate schedule (scalar arithmetic in the step) is built for
  one-step epochs, since no data set is read.

  Returns:
    (compiled step, abstract state, seconds to trace, lower and compile).
  """
  config, model = ctx.config, ctx.model
  schedule = train.learning_rate_schedule(
      config, 1, max(config.num_train_steps, config.num_epochs))
  tx = train.create_optimizer(config, schedule)
  init_key, base_key = jax.random.split(jax.random.key(config.seed))
  state = sharding.replicated_shapes(
      jax.eval_shape(functools.partial(train.initial_state, model, tx,
                                       config), init_key), ctx.mesh)
  size, channels = config.dataset.image_size, config.dataset.in_channels
  shards = ctx.batch_sharding
  batch = {'image': jax.ShapeDtypeStruct(
               (config.batch_size, size, size, channels), jnp.float32,
               sharding=shards),
           'label': jax.ShapeDtypeStruct((config.batch_size, size, size),
                                         jnp.int32, sharding=shards)}
  step = train.jit_train_step(model, tx, schedule, dict(config.loss),
                              base_key, ctx.mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return compiled, state, time.perf_counter() - start


def analyse(ctx: context.RunContext) -> dict[str, Any]:
  """`describe` of the context's compiled train step, with its layout."""
  config = ctx.config
  compiled, state, compile_s = compile_train_step(ctx)
  return {'model': config.model.name, 'image_size': config.dataset.image_size,
          'dtype': config.dtype, 'processes': jax.process_count(),
          'devices': jax.device_count(), 'global_batch': config.batch_size,
          'compile_s': compile_s,
          **describe(compiled.as_text(), state.params, state.batch_stats)}


def summary_line(record: dict[str, Any]) -> str:
  others = {kind: counts['instructions']
            for kind, counts in record['kinds'].items()
            if kind != ALL_REDUCE and counts['instructions']}
  reduce = record['kinds'][ALL_REDUCE]
  return (f"{record['model']} {record['image_size']}px, {record['processes']}"
          f" process(es) x {record['devices'] // record['processes']} "
          f"devices, global batch {record['global_batch']}: "
          f"{reduce['instructions']} all-reduces of {reduce['arrays']} "
          f"arrays, {reduce['bytes']:,} bytes = gradients "
          f"{record['gradient_bytes']:,} (parameters "
          f"{record['param_bytes']:,}) + {record['other_all_reduce_bytes']:,};"
          f" other collectives: {others or 'none'}; compiled in "
          f"{record['compile_s']:.1f} s")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required.')
  distributed.initialize()
  record = analyse(context.create(config, 'train', open_data=False))
  print(summary_line(record), flush=True)
  if flags.FLAGS.out and jax.process_index() == 0:
    files.write_json(flags.FLAGS.out, record)


if __name__ == '__main__':
  # Defined here, not at import: other modules define flags of these names.
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/*.py) whose train step to analyse.',
      lock_config=True)
  flags.DEFINE_string('out', None, 'JSON file for the record (written by '
                      'process 0).')
  cli.run_app(main)
