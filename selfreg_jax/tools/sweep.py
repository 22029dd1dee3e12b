"""Grid sweeps: one run (workdir) per combination of config values.

  python -m selfreg_jax.tools.sweep --config configs/demo.py --workdir runs/sweep \
      --grid loss.scr_weight=0,0.01 --grid loss.ifd_weight=0,0.01
  python -m selfreg_jax.tools.sweep --config configs/demo.py --workdir runs/sweep \
      --grid loss.scr_weight=0,0.01 --print-commands

The grid is `config.sweep` when the config has one, else the
`--grid KEY=V1,V2,...` flags. `config.sweep` maps keys to lists of values,
either nested like the config (`config.sweep = {'loss': {'scr_weight':
[0.0, 0.01]}}`) or with dotted keys (`config.sweep = ml_collections.ConfigDict(
{'loss.scr_weight': [0.0, 0.01]}, allow_dotted_keys=True)`); the --grid flags
(values parsed as Python literals, anything else kept as a string). The
points are the Cartesian product, keys in the given order (`seed` first). Point
{a: 1, b: 2} runs in `ROOT/a=1,b=2` with `config.a = 1`, `config.b = 2`
(and without `config.sweep`).

Any config field can be a key, `seed` included: a grid over `seed` and a
setting gives repeated runs of each setting, which `selfreg_jax.tools.report`
groups into arms (mean +- std over seeds, paired differences).

The points run one after another in this process (train.train_and_evaluate,
mode train_and_eval). The sweep is resumable: a point whose workdir already
holds an evaluation summary (`eval/*/summary.json`) is skipped, and an
interrupted point resumes from its last checkpoint. `ROOT/sweep.json` records
each point's status and its wall time in seconds (summed over the sessions
that ran it). When every point is done, the report of the sweep
(`selfreg_jax.tools.report` on ROOT, split config.eval.split) is written into ROOT. With --print-commands
nothing runs: one `python main.py ...` line per point is printed (run from
the repository root), e.g. for a cluster scheduler.
"""

import ast
import copy
import itertools
import json
import pathlib
import shlex
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from data_prep import build
from selfreg_jax import train
from selfreg_jax.common import cli
from selfreg_jax.common import files
from selfreg_jax.common import runtime
from selfreg_jax.core import configuration
from selfreg_jax.evaluation import evaluate
from selfreg_jax.tools import report

SWEEP_FIELD = 'sweep'
SWEEP_RECORD = 'sweep.json'
Grid = dict[str, list[Any]]


def parse_value(text: str) -> Any:
  """'0.01' -> 0.01, 'True' -> True, '(1, 2)' -> (1, 2); else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_grid_flags(specs: Sequence[str]) -> Grid:
  """['loss.scr_weight=0,0.01', ...] -> {'loss.scr_weight': [0, 0.01], ...}."""
  grid = {}
  for spec in specs:
    key, sep, values = spec.partition('=')
    if not sep or not key or not values:
      raise cli.UserError(f'--grid {spec!r}: expected KEY=V1,V2,...')
    if key in grid:
      raise cli.UserError(f'--grid {spec!r}: key {key!r} given twice.')
    grid[key] = [parse_value(v) for v in values.split(',')]
  return grid


def _flat_grid(sweep: ml_collections.ConfigDict) -> Grid:
  """Nested sections of value lists -> {dotted key: list of values}; a single
  value is a list of one."""
  return {key: list(values) if isinstance(values, (list, tuple)) else [values]
          for key, values in configuration.flatten(sweep).items()}


def config_grid(config: ml_collections.ConfigDict,
                grid_flags: Sequence[str] = ()) -> Grid:
  """The sweep grid: config.sweep if present, else the --grid flags."""
  sweep = config.get(SWEEP_FIELD)
  if sweep is not None:
    if grid_flags:
      raise cli.UserError('Both config.sweep and --grid are given; use one.')
    grid = _flat_grid(sweep)
  else:
    grid = parse_grid_flags(grid_flags)
  if not grid:
    raise cli.UserError('No sweep grid: set config.sweep or pass --grid '
                     'KEY=V1,V2,...')
  for key, values in grid.items():
    if not values:
      raise cli.UserError(f'Sweep key {key!r} has no values.')
  return grid


def grid_points(grid: Grid) -> list[dict[str, Any]]:
  """The Cartesian product of the grid, as {key: value} dicts.

  `seed` varies slowest (first key), the other keys follow in the grid's
  order: the points of one seed run together, so an interrupted study of
  seeds x settings still has complete sets of settings.
  """
  keys = sorted(grid, key=lambda k: k != report.SEED_KEY)
  return [dict(zip(keys, values))
          for values in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
  """{'loss.scr_weight': 0.01} -> 'loss.scr_weight=0.01' (the run folder)."""
  name = ','.join(f'{key}={value}' for key, value in point.items())
  if '/' in name or name.startswith('.'):
    raise cli.UserError(f'Sweep point {point} gives the folder name {name!r}; '
                     "values must not contain '/'.")
  return name


def point_config(config: ml_collections.ConfigDict,
                 point: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's values set, without config.sweep."""
  # Copied without the sweep: a deep copy of a ConfigDict with dotted keys
  # fails in ml_collections.
  result = copy.deepcopy(ml_collections.ConfigDict(
      {key: config[key] for key in config.keys() if key != SWEEP_FIELD}))
  for key, value in point.items():
    cli.check_config_key(result, key)
    *parents, leaf = key.split('.')
    node = result
    for part in parents:
      node = node[part]
    if isinstance(node[leaf], float) and isinstance(value, int):
      value = float(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise cli.UserError(
          f'Sweep key {key!r}: cannot set {value!r}: {e}') from e
  return result


def is_done(workdir: str | pathlib.Path) -> bool:
  """Whether a run folder holds an evaluation summary."""
  return any(pathlib.Path(workdir).glob(
      f'{evaluate.EVAL_DIR}/*/{evaluate.SUMMARY_FILE}'))


def _record_point(root: pathlib.Path, name: str, status: str,
                  seconds: float) -> None:
  """Adds a point's status and wall time to ROOT/sweep.json (process 0)."""
  if jax.process_index() > 0:
    return
  path = root / SWEEP_RECORD
  record = json.loads(path.read_text()) if path.exists() else {}
  entry = record.setdefault(name, {'status': status, 'seconds': 0.0})
  entry['status'] = status
  entry['seconds'] = round(entry['seconds'] + seconds, 1)
  files.write_json(path, record)


def run_sweep(config: ml_collections.ConfigDict, root: str | pathlib.Path,
              grid: Grid) -> dict[str, str]:
  """Trains and evaluates every point not done yet, once every point's config
  is valid, then writes the report.

  Returns {point folder name: 'trained' or 'skipped'}.
  """
  root = pathlib.Path(root)
  points = grid_points(grid)
  configs = {point_name(p): point_config(config, p) for p in points}
  for name, run_config in configs.items():
    try:
      configuration.validate(run_config)
    except configuration.ConfigError as e:
      raise configuration.ConfigError(f'sweep point {name}: {e}') from e
  build.ensure_demo_dataset(config.dataset)
  status = {}
  for i, (name, run_config) in enumerate(configs.items()):
    workdir = root / name
    if is_done(workdir):
      logging.info('Sweep point %d/%d %s: evaluated already, skipped.', i + 1,
                   len(points), name)
      status[name] = 'skipped'
      continue
    logging.info('Sweep point %d/%d: %s', i + 1, len(points), name)
    start, outcome = time.time(), 'interrupted'
    try:
      train.train_and_evaluate(run_config, str(workdir), 'train_and_eval')
      outcome = 'done' if is_done(workdir) else 'interrupted'
    finally:
      _record_point(root, name, outcome, time.time() - start)
    if outcome != 'done':   # pre-empted: rerun the sweep to resume
      return status
    status[name] = 'trained'
  if jax.process_index() == 0:
    report.write_report([root], split=config.eval.split)
  logging.info('Sweep report: %s', root / report.REPORT_MD)
  return status


def point_commands(config_arg: str, overrides: dict[str, Any],
                   root: str | pathlib.Path, grid: Grid) -> list[str]:
  """One `python main.py` command line per point.

  config_arg: the --config value (file, with ':param' if any); overrides:
  the dotted --config.* overrides of the sweep command, repeated in each.
  """
  commands = []
  for point in grid_points(grid):
    args = ['python', 'main.py', f'--config={config_arg}',
            f'--workdir={pathlib.Path(root) / point_name(point)}']
    settings = dict(overrides)
    settings.update(point)
    args += [f'--config.{key}={value}' for key, value in settings.items()]
    commands.append(shlex.join(args))
  return commands


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  grid = config_grid(config, FLAGS.grid)
  if FLAGS['print-commands'].value:
    for point in grid_points(grid):
      point_config(config, point)  # Refuses unknown keys.
    overrides = configuration.flatten(
        config_flags.get_override_values(FLAGS['config']))
    print('\n'.join(point_commands(
        config_flags.get_config_filename(FLAGS['config']), overrides,
        FLAGS.workdir, grid)))
    return
  status = run_sweep(config, FLAGS.workdir, grid)
  logging.info('Sweep done: %s', status)


if __name__ == '__main__':
  # The process settings of main.py (restarts once; before JAX starts).
  runtime.prepare_process()
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Sweep root: one folder per point.')
  flags.DEFINE_multi_string('grid', [], 'KEY=V1,V2,... (when the config has '
                            'no sweep field); repeat for more keys.')
  flags.DEFINE_bool('print-commands', False, 'Print one main.py command per '
                    'point instead of running them.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run_app(main)
