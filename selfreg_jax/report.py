"""Collects the evaluations of several runs into one table and plot.

  python -m selfreg_jax.report runs/sweep [runs/other_run ...] [--out DIR]

Each ROOT is a run folder (it has `eval/`) or a folder of runs (its
subfolders that have `eval/`, e.g. a sweep root). Of each run, the latest
evaluation is used: the `eval/<split>_step<N>/summary.json` with the largest
N (optionally of one --split), and the run's config is the 'config' item of
its latest checkpoint, flattened to dotted keys. Only keys whose values
differ between the runs are shown.

Files written to --out (default: the first ROOT), each to a temporary name
then renamed:
  report.md   markdown table: run, split, step, mean Dice (%), mean HD95, per
              class Dice (%) and HD95, then the differing config keys
  report.csv  the same columns, raw values (Dice as a fraction, NaN as 'nan')
  mean_dice.png  mean Dice (%) versus a swept value (--x, default the first
              differing numeric key; the run names when none is numeric), one
              line per combination of the other differing keys
"""

import csv
import dataclasses
import io
import json
import math
import pathlib
import re
from typing import Any, Sequence

from absl import app
from absl import flags
from matplotlib import figure as mpl_figure
import orbax.checkpoint as ocp

from selfreg_jax import analysis
from selfreg_jax import checkpoints
from selfreg_jax import cli
from selfreg_jax import evaluate

REPORT_MD = 'report.md'
REPORT_CSV = 'report.csv'
REPORT_PLOT = 'mean_dice.png'
_EVAL_FOLDER = re.compile(r'^(?P<split>.+)_step(?P<step>\d+)$')


@dataclasses.dataclass(frozen=True)
class Run:
  """One run's latest evaluation summary and its flattened config."""
  name: str
  workdir: pathlib.Path
  summary: dict[str, Any]
  config: dict[str, Any]


def find_run_dirs(roots: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
  """Run folders among `roots` and their direct subfolders, in order."""
  runs = []
  for root in map(pathlib.Path, roots):
    if not root.is_dir():
      raise FileNotFoundError(f'{root}: no such folder.')
    if (root / evaluate.EVAL_DIR).is_dir():
      runs.append(root)
      continue
    found = sorted(p for p in root.iterdir()
                   if (p / evaluate.EVAL_DIR).is_dir())
    if not found:
      raise FileNotFoundError(f'{root}: neither a run folder (no '
                              f'{evaluate.EVAL_DIR}/) nor a folder of runs.')
    runs.extend(found)
  return runs


def latest_summary_file(workdir: pathlib.Path,
                        split: str | None = None) -> pathlib.Path:
  """`eval/<split>_step<N>/summary.json` of the largest N."""
  candidates = []
  for path in (workdir / evaluate.EVAL_DIR).glob(f'*/{evaluate.SUMMARY_FILE}'):
    match = _EVAL_FOLDER.match(path.parent.name)
    if match and (split is None or match['split'] == split):
      candidates.append((int(match['step']), path.stat().st_mtime, path))
  if not candidates:
    raise FileNotFoundError(
        f'{workdir / evaluate.EVAL_DIR}: no <split>_step<N>/'
        f'{evaluate.SUMMARY_FILE}' + (f' for split {split!r}' if split else ''))
  return max(candidates)[2]


def flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples (comparable)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      is_list = isinstance(value, list)
      flat[f'{prefix}{key}'] = tuple(value) if is_list else value
  return flat


def load_config(workdir: pathlib.Path) -> dict[str, Any]:
  """The flattened config saved with the run's latest checkpoint."""
  with checkpoints.create_manager(workdir, read_only=True) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{manager.directory}: no checkpoint, so no '
                              'saved config.')
    restored = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
  return flatten(restored['config'])


def load_run(workdir: pathlib.Path, split: str | None = None) -> Run:
  path = latest_summary_file(workdir, split)
  try:
    summary = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise cli.UserError(f'{path}: not valid JSON ({e}).') from e
  missing = {'mean_dice', 'mean_hd95', 'per_class', 'class_names'} - set(
      summary)
  if missing:
    raise cli.UserError(f'{path}: summary lacks {sorted(missing)}.')
  return Run(workdir.name, workdir, summary, load_config(workdir))


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
  """Keys (sorted) whose value differs between configs, or is missing in
  some; none for a single config."""
  if len(configs) < 2:
    return []
  keys = set().union(*configs)
  return sorted(k for k in keys
                if len({repr(c.get(k, '<missing>')) for c in configs}) > 1)


def _number(value: Any) -> float:
  return float('nan') if value is None else float(value)


def table_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[Any]]]:
  """Header and raw rows (see the module docstring for the columns)."""
  classes = list(dict.fromkeys(n for r in runs
                               for n in r.summary['class_names']))
  keys = differing_keys([r.config for r in runs])
  header = ['run', 'split', 'step', 'mean_dice', 'mean_hd95']
  header += [f'{metric}/{name}' for name in classes
             for metric in ('dice', 'hd95')]
  header += keys
  rows = []
  for run in runs:
    s = run.summary
    row = [run.name, s.get('split'), s.get('step'), _number(s['mean_dice']),
           _number(s['mean_hd95'])]
    row += [_number(s['per_class'][metric].get(name)) for name in classes
            for metric in ('dice', 'hd95')]
    row += [run.config.get(k, '') for k in keys]
    rows.append(row)
  return header, rows


def _is_dice(column: str) -> bool:
  return column in ('mean_dice',) or column.startswith('dice/')


def _is_metric(column: str) -> bool:
  return column.startswith(('mean_', 'dice/', 'hd95/'))


def _cell(column: str, value: Any) -> str:
  if _is_metric(column) and isinstance(value, float):
    if math.isnan(value):
      return 'nan'
    return f'{100 * value:.2f}' if _is_dice(column) else f'{value:.2f}'
  return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """Dice columns in %, HD95 with 2 decimals, config values as they are."""
  titles = [f'{c} (%)' if _is_dice(c) else c for c in header]
  lines = ['| ' + ' | '.join(titles) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(_cell(c, v) for c, v in zip(header, row)) + ' |'
            for row in rows]
  return '\n'.join(lines) + '\n'


def csv_table(header: list[str], rows: list[list[Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows([[repr(v) if isinstance(v, float) else v for v in row]
                    for row in rows])
  return buffer.getvalue()


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_key(runs: Sequence[Run], x_key: str | None) -> str | None:
  """The key plotted on the x axis: `x_key`, else the first differing key
  with numbers in every run, else None (the run names are used)."""
  keys = differing_keys([r.config for r in runs])
  if x_key is not None:
    if any(not _is_number(r.config.get(x_key)) for r in runs):
      raise cli.UserError(f'--x={x_key}: not a number in every run config.')
    return x_key
  return next((k for k in keys
               if all(_is_number(r.config.get(k)) for r in runs)), None)


def dice_plot(runs: Sequence[Run], x_key: str | None) -> bytes:
  """PNG of mean Dice (%) versus `x_key` (or the run names), one line per
  combination of the other differing keys."""
  others = [k for k in differing_keys([r.config for r in runs]) if k != x_key]
  lines = {}
  for index, run in enumerate(runs):
    x = run.config[x_key] if x_key else index
    label = ', '.join(f'{k}={run.config.get(k)}' for k in others) or None
    lines.setdefault(label, []).append((x, 100 * _number(
        run.summary['mean_dice'])))
  figure = mpl_figure.Figure(figsize=(5.5, 4))
  axis = figure.subplots()
  for label, points in lines.items():
    points.sort()
    axis.plot([p[0] for p in points], [p[1] for p in points], 'o-',
              label=label)
  if x_key:
    axis.set_xticks(sorted({run.config[x_key] for run in runs}))
    axis.set_xlabel(x_key)
  else:
    axis.set_xticks(range(len(runs)), [r.name for r in runs], rotation=30,
                    ha='right', fontsize=8)
  axis.set_ylabel('mean Dice (%)')
  axis.grid(alpha=0.3)
  if any(label is not None for label in lines):
    axis.legend(fontsize=7)
  return analysis.figure_png(figure)


def write_report(roots: Sequence[str | pathlib.Path],
                 out_dir: str | pathlib.Path | None = None,
                 split: str | None = None,
                 x_key: str | None = None) -> list[Run]:
  """Writes report.md, report.csv and mean_dice.png; returns the runs."""
  runs = [load_run(w, split) for w in find_run_dirs(roots)]
  out_dir = pathlib.Path(out_dir if out_dir is not None else roots[0])
  header, rows = table_rows(runs)
  write = evaluate.write_atomic  # pylint: disable=protected-access
  write(out_dir / REPORT_MD, markdown_table(header, rows).encode())
  write(out_dir / REPORT_CSV, csv_table(header, rows).encode())
  write(out_dir / REPORT_PLOT, dice_plot(runs, plot_key(runs, x_key)))
  return runs


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Give at least one run folder or folder of runs.')
  runs = write_report(argv[1:], FLAGS.out, FLAGS.split, FLAGS.x)
  out_dir = pathlib.Path(FLAGS.out or argv[1])
  print((out_dir / REPORT_MD).read_text(), end='')
  print(f'{len(runs)} runs; report in {out_dir}')


if __name__ == '__main__':
  flags.DEFINE_string('out', None, 'Output folder; default the first ROOT.')
  flags.DEFINE_string('split', None, 'Use only evaluations of this split.')
  flags.DEFINE_string('x', None, 'Config key on the plot x axis; default the '
                      'first differing numeric key.')
  cli.run_app(main)
