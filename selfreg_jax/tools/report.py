"""Collects the evaluations of several runs into one table and plot.

  python -m selfreg_jax.tools.report runs/sweep [runs/other_run ...] [--out DIR]

Each ROOT is a run folder (it has `eval/`) or a folder of runs (its
subfolders that have `eval/`, e.g. a sweep root). Of each run, the latest
evaluation is used: the `eval/<split>_step<N>/summary.json` with the largest
N (optionally of one --split), and the run's config is the 'config' item of
its latest checkpoint, flattened to dotted keys. Only keys whose values
differ between the runs are shown.

Runs whose configs differ only in `seed` are repeats of one ARM (e.g. a
sweep over `loss.use_selfreg` and `seed`). Per arm the report gives n and the
mean and sample standard deviation (ddof 1) over seeds of every metric; with
exactly two arms, also the paired per-seed difference (second arm minus first,
seeds present in both) with its 95% confidence interval from the t
distribution, `mean +- t(0.975, n-1) * sd / sqrt(n)`, and the paired t-test's
p-value.

Files written to --out (default: the first ROOT), each to a temporary name
then renamed:
  report.md   the arms (mean +- std, n), the paired difference when there are
              two arms, then one row per run: run, split, step, mean Dice (%),
              IoU (%), HD95, ASSD, per class Dice (%) and HD95, and the
              differing config keys
  report.csv  the per-run rows, raw values (Dice as a fraction, NaN as 'nan')
  arms.csv    per arm and metric: n, mean, std (raw values)
  mean_dice.png  mean Dice (%) per arm, mean +- std error bars over seeds and
              each seed as a dot: bars for a boolean or categorical setting,
              a line over a numeric one (--x, default the first differing
              numeric key)
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
import numpy as np
from scipy import stats

from selfreg_jax.common import cli
from selfreg_jax.common import files
from selfreg_jax.core import checkpoints
from selfreg_jax.core import configuration
from selfreg_jax.evaluation import evaluate

REPORT_MD = 'report.md'
REPORT_CSV = 'report.csv'
REPORT_PLOT = 'mean_dice.png'
ARMS_CSV = 'arms.csv'
SEED_KEY = 'seed'
CONFIDENCE = 0.95
SUMMARY_METRICS = ('mean_dice', 'mean_jaccard', 'mean_hd95', 'mean_assd')
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


def load_config(workdir: pathlib.Path) -> dict[str, Any]:
  """The config saved with the run's latest checkpoint, by dotted key."""
  config = checkpoints.stored_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{workdir}: the latest checkpoint holds no '
                            'config.')
  return configuration.flatten(config)


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


def _per_class_columns(runs: Sequence[Run]) -> list[str]:
  classes = list(dict.fromkeys(n for r in runs
                               for n in r.summary['class_names']))
  return [f'{metric}/{name}' for name in classes
          for metric in ('dice', 'hd95')]


def metric_values(run: Run, columns: Sequence[str]) -> list[float]:
  """The run's value of each metric column ('mean_*' or 'METRIC/class')."""
  values = []
  for column in columns:
    metric, _, name = column.partition('/')
    values.append(_number(run.summary[column] if not name else
                          run.summary['per_class'][metric].get(name)))
  return values


def table_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[Any]]]:
  """Header and raw rows (see the module docstring for the columns)."""
  keys = differing_keys([r.config for r in runs])
  metrics = list(SUMMARY_METRICS) + _per_class_columns(runs)
  header = ['run', 'split', 'step'] + metrics + keys
  rows = [[run.name, run.summary.get('split'), run.summary.get('step')]
          + metric_values(run, metrics)
          + [run.config.get(k, '') for k in keys] for run in runs]
  return header, rows


@dataclasses.dataclass(frozen=True)
class Arm:
  """Runs whose configs differ only in the seed.

  Attributes:
    setting: {config key: value} of the keys that differ between arms.
    runs: the arm's runs, by seed.
  """
  setting: dict[str, Any]
  runs: tuple[Run, ...]

  @property
  def label(self) -> str:
    return ', '.join(f'{k}={v}' for k, v in self.setting.items()) or 'all runs'

  @property
  def seeds(self) -> list[Any]:
    return [run.config.get(SEED_KEY) for run in self.runs]


def _sort_key(values: Sequence[Any]) -> tuple[Any, ...]:
  """Orders settings by value (False before True, numbers numerically)."""
  return tuple((0, v, '') if _is_number(v) or isinstance(v, bool)
               else (1, 0, repr(v)) for v in values)


def group_arms(runs: Sequence[Run]) -> list[Arm]:
  """The runs grouped into arms (ordered by their settings)."""
  keys = [k for k in differing_keys([r.config for r in runs]) if k != SEED_KEY]
  groups = {}
  for run in runs:
    setting = tuple(run.config.get(k) for k in keys)
    groups.setdefault(repr(setting), (setting, []))[1].append(run)
  arms = []
  for setting, members in sorted(groups.values(),
                                 key=lambda item: _sort_key(item[0])):
    members.sort(key=lambda r: _sort_key([r.config.get(SEED_KEY)]))
    seeds = [r.config.get(SEED_KEY) for r in members]
    if len(set(map(repr, seeds))) < len(seeds):
      raise ValueError(
          f'runs {", ".join(str(r.workdir) for r in members)} have the same '
          'config, seed included: give each run once.')
    arms.append(Arm(dict(zip(keys, setting)), tuple(members)))
  return arms


@dataclasses.dataclass(frozen=True)
class Spread:
  """n, mean and sample standard deviation (NaN for n < 2) of the finite
  values of a metric."""
  n: int
  mean: float
  std: float

  @classmethod
  def of(cls, values: Sequence[float]) -> 'Spread':
    finite = np.asarray([v for v in values if np.isfinite(v)], np.float64)
    if not finite.size:
      return cls(0, math.nan, math.nan)
    std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
    return cls(int(finite.size), float(finite.mean()), std)


def arm_statistics(arm: Arm, columns: Sequence[str]) -> dict[str, Spread]:
  """{metric column: Spread over the arm's seeds}."""
  per_run = [metric_values(run, columns) for run in arm.runs]
  return {column: Spread.of([values[i] for values in per_run])
          for i, column in enumerate(columns)}


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """Second arm minus first over the seeds both have: n pairs, the mean and
  standard deviation of the differences, the CONFIDENCE interval of the mean
  (t distribution) and the paired t-test's two-sided p-value (NaN for n < 2)."""
  n: int
  mean: float
  std: float
  low: float
  high: float
  p_value: float


def paired_difference(first: Arm, second: Arm,
                      column: str) -> PairedDifference:
  """`second` minus `first` in `column`, paired by seed."""
  by_seed = [{repr(run.config.get(SEED_KEY)): metric_values(run, [column])[0]
              for run in arm.runs} for arm in (first, second)]
  seeds = [s for s in by_seed[0] if s in by_seed[1]
           and np.isfinite(by_seed[0][s]) and np.isfinite(by_seed[1][s])]
  a = np.asarray([by_seed[0][s] for s in seeds], np.float64)
  b = np.asarray([by_seed[1][s] for s in seeds], np.float64)
  spread = Spread.of(list(b - a))
  if spread.n < 2:
    return PairedDifference(spread.n, spread.mean, math.nan, math.nan,
                            math.nan, math.nan)
  margin = (stats.t.ppf(0.5 + CONFIDENCE / 2, spread.n - 1) * spread.std
            / math.sqrt(spread.n))
  p_value = float(stats.ttest_rel(b, a).pvalue)
  return PairedDifference(spread.n, spread.mean, spread.std,
                          spread.mean - margin, spread.mean + margin, p_value)


def _is_percent(column: str) -> bool:
  return column in ('mean_dice', 'mean_jaccard') or column.startswith('dice/')


def _is_metric(column: str) -> bool:
  return column.startswith(('mean_', 'dice/', 'hd95/'))


_TITLES = {'mean_dice': 'mean Dice', 'mean_jaccard': 'mean IoU',
           'mean_hd95': 'mean HD95', 'mean_assd': 'mean ASSD'}


def _title(column: str) -> str:
  title = _TITLES.get(column, column)
  return f'{title} (%)' if _is_percent(column) else title


def _format(column: str, value: float, signed: bool = False) -> str:
  if math.isnan(value):
    return 'nan'
  value = 100 * value if _is_percent(column) else value
  return f'{value:+.2f}' if signed else f'{value:.2f}'


def _cell(column: str, value: Any) -> str:
  if _is_metric(column) and isinstance(value, float):
    return _format(column, value)
  return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """Dice and IoU in %, distances with 2 decimals, config values as they
  are."""
  lines = ['| ' + ' | '.join(map(_title, header)) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(_cell(c, v) for c, v in zip(header, row)) + ' |'
            for row in rows]
  return '\n'.join(lines) + '\n'


def arms_markdown(arms: Sequence[Arm], columns: Sequence[str]) -> str:
  """The arms table (mean +- std over seeds, n) and, for two arms, the paired
  differences."""
  lines = ['| arm | seeds | ' + ' | '.join(map(_title, columns)) + ' |',
           '|' + '|'.join('---' for _ in range(len(columns) + 2)) + '|']
  for arm in arms:
    spreads = arm_statistics(arm, columns)
    cells = [f'{_format(c, spreads[c].mean)} ± {_format(c, spreads[c].std)} '
             f'(n={spreads[c].n})' for c in columns]
    lines.append(f'| {arm.label} | {", ".join(map(str, arm.seeds))} | '
                 + ' | '.join(cells) + ' |')
  text = '\n'.join(lines) + '\n'
  if len(arms) == 2:
    first, second = arms
    text += (f'\nPaired by seed: **{second.label}** minus **{first.label}**, '
             f'mean difference with its {100 * CONFIDENCE:.0f}% confidence '
             'interval (t distribution) and the paired t-test p-value.\n\n'
             f'| metric | pairs | difference | {100 * CONFIDENCE:.0f}% CI | '
             'p |\n|---|---|---|---|---|\n')
    for column in columns:
      d = paired_difference(first, second, column)
      text += (f'| {_title(column)} | {d.n} | {_format(column, d.mean, True)} '
               f'| [{_format(column, d.low, True)}, '
               f'{_format(column, d.high, True)}] | {d.p_value:.3g} |\n')
  return text


def csv_table(header: list[str], rows: list[list[Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows([[repr(v) if isinstance(v, float) else v for v in row]
                    for row in rows])
  return buffer.getvalue()


def arms_csv(arms: Sequence[Arm], columns: Sequence[str]) -> str:
  """One row per arm and metric: arm, seeds, metric, n, mean, std."""
  rows = [[arm.label, ' '.join(map(str, arm.seeds)), column, spread.n,
           spread.mean, spread.std]
          for arm in arms
          for column, spread in arm_statistics(arm, columns).items()]
  return csv_table(['arm', 'seeds', 'metric', 'n', 'mean', 'std'], rows)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_key(runs: Sequence[Run], x_key: str | None) -> str | None:
  """The key plotted on the x axis: `x_key`, else the first differing key
  (the seed aside) with numbers in every run, else None (arms as bars)."""
  keys = [k for k in differing_keys([r.config for r in runs])
          if k != SEED_KEY]
  if x_key is not None:
    if any(not _is_number(r.config.get(x_key)) for r in runs):
      raise cli.UserError(f'--x={x_key}: not a number in every run config.')
    return x_key
  return next((k for k in keys
               if all(_is_number(r.config.get(k)) for r in runs)), None)


def dice_plot(arms: Sequence[Arm], x_key: str | None) -> bytes:
  """PNG of mean Dice (%) per arm: mean +- std over seeds, and each seed's
  value as a dot. Bars from zero when `x_key` is None (boolean or categorical
  settings), else lines over `x_key`, one per combination of the other keys."""
  figure = mpl_figure.Figure(figsize=(5.5, 4))
  axis = figure.subplots()
  spreads = [arm_statistics(arm, ['mean_dice'])['mean_dice'] for arm in arms]
  seeds_dice = [[100 * v for v in np.ravel([metric_values(r, ['mean_dice'])
                                            for r in arm.runs])]
                for arm in arms]
  if x_key is None:
    positions = np.arange(len(arms))
    axis.bar(positions, [100 * s.mean for s in spreads],
             yerr=[100 * np.nan_to_num(s.std) for s in spreads], capsize=6,
             color='#9ecae1', edgecolor='#3182bd')
    for position, values in zip(positions, seeds_dice):
      axis.plot([position] * len(values), values, 'o', color='#08519c',
                markersize=4)
    axis.set_xticks(positions, [f'{a.label}\n(n={s.n})'
                                for a, s in zip(arms, spreads)], fontsize=8)
    axis.set_ylim(0, 100)
  else:
    lines = {}
    for arm, spread, values in zip(arms, spreads, seeds_dice):
      others = ', '.join(f'{k}={v}' for k, v in arm.setting.items()
                         if k != x_key) or None
      lines.setdefault(others, []).append(
          (arm.setting.get(x_key, arm.runs[0].config.get(x_key)), spread,
           values))
    for label, points in lines.items():
      points.sort(key=lambda p: p[0])
      axis.errorbar([p[0] for p in points], [100 * p[1].mean for p in points],
                    yerr=[100 * np.nan_to_num(p[1].std) for p in points],
                    fmt='o-', capsize=4, label=label)
      for x, _, values in points:
        axis.plot([x] * len(values), values, '.', color='0.4')
    axis.set_xticks(sorted({p[0] for points in lines.values()
                            for p in points}))
    axis.set_xlabel(x_key)
    if any(label is not None for label in lines):
      axis.legend(fontsize=7)
  axis.set_ylabel('mean Dice (%), mean ± std over seeds')
  axis.grid(alpha=0.3, axis='y')
  return files.figure_png(figure)


def write_report(roots: Sequence[str | pathlib.Path],
                 out_dir: str | pathlib.Path | None = None,
                 split: str | None = None,
                 x_key: str | None = None) -> list[Run]:
  """Writes report.md, report.csv, arms.csv and mean_dice.png; returns the
  runs."""
  runs = [load_run(w, split) for w in find_run_dirs(roots)]
  out_dir = pathlib.Path(out_dir if out_dir is not None else roots[0])
  arms = group_arms(runs)
  header, rows = table_rows(runs)
  arm_columns = list(SUMMARY_METRICS) + [
      c for c in _per_class_columns(runs) if c.startswith('dice/')]
  markdown = (f'## Arms ({len(arms)}), mean ± std over seeds\n\n'
              + arms_markdown(arms, arm_columns)
              + f'\n## Runs ({len(runs)})\n\n' + markdown_table(header, rows))
  write = files.write_atomic
  write(out_dir / REPORT_MD, markdown.encode())
  write(out_dir / REPORT_CSV, csv_table(header, rows).encode())
  write(out_dir / ARMS_CSV, arms_csv(arms, arm_columns).encode())
  write(out_dir / REPORT_PLOT, dice_plot(arms, plot_key(runs, x_key)))
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
