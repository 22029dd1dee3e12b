"""Builds a data set into TFDS's ArrayRecord format.

  python -m data_prep.build demo
  python -m data_prep.build synapse --src ~/data/Synapse --val-cases 4
  python -m data_prep.build monuseg --src ~/data/MoNuSeg --out /data/tfds
  python -m data_prep.build glas --src ~/data/GlaS --option seed=1

`python -m data_prep.build NAME --help` lists the layouts of the source folder
that data set accepts and its build options with their defaults. An option
that the layout found does not use is refused; `--val-cases 0` builds no
validation split.

The result lands in `DATA_DIR/selfreg_NAME/VERSION/` (DATA_DIR defaults to
$TFDS_DATA_DIR or ~/tensorflow_datasets). Building is idempotent: a data set
that is already built from the same layout with the same options is left as
it is. TFDS writes
into an `incomplete.*` folder and renames it when done, so an interrupted
build leaves nothing that reads as a data set; the next build removes such
leftovers. A build that fails removes the folders it created (DATA_DIR,
DATA_DIR/selfreg_NAME), never one that was there before. A mistake in the
input (an option, a missing or empty source folder, a bad source file) ends
the CLI with one `error:` line naming it, and exit status 2.
"""

import argparse
import ast
import contextlib
import json
import pathlib
import shutil
import sys
import tempfile
import textwrap
import types
from typing import Any, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import tensorflow_datasets as tfds

from data_prep import builders
from data_prep import sources
from selfreg_jax.common import cli
from selfreg_jax.core import input_pipeline


def default_data_dir() -> pathlib.Path:
  """TFDS's data directory: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return pathlib.Path(tfds.core.constants.DATA_DIR).expanduser()


def _check_source_folder(name: str, src: pathlib.Path | None,
                         instructions: str) -> None:
  """Raises FileNotFoundError unless `src` is a folder holding something;
  the download instructions are printed first."""
  if src is None:
    problem = (f'data set {name!r} is built from a downloaded copy; pass its '
               'folder with --src (src=...)')
  elif not src.is_dir():
    problem = (f'{src}: source folder of {name!r} does not exist or is not a '
               'folder')
  elif not any(src.iterdir()):
    problem = f'{src}: source folder of {name!r} is empty'
  else:
    return
  print(instructions)
  raise FileNotFoundError(
      f'{problem}; the download instructions are printed above.')


@contextlib.contextmanager
def _removed_on_failure(folders: Sequence[pathlib.Path]) -> Iterator[None]:
  """Deletes those of `folders` that do not exist yet if the block fails."""
  created = [folder for folder in folders if not folder.exists()]
  try:
    yield
  except BaseException:
    for folder in reversed(created):
      shutil.rmtree(folder, ignore_errors=True)
    raise


def remove_incomplete_builds(dataset_dir: pathlib.Path) -> list[pathlib.Path]:
  """Deletes leftovers of interrupted builds of `dataset_dir`; returns them.

  TFDS builds `NAME/VERSION` inside `NAME/incomplete.XXXXXX_VERSION` and
  renames it at the end; a killed build leaves that folder behind.
  """
  leftovers = sorted(dataset_dir.parent.glob(
      f'{tfds.core.constants.INCOMPLETE_PREFIX}*_{dataset_dir.name}'))
  for leftover in leftovers:
    shutil.rmtree(leftover)
  return leftovers


def _recorded_build(dataset_dir: pathlib.Path) -> dict[str, Any]:
  """{'layout': ..., 'options': ...} as recorded in a built data set."""
  metadata_file = dataset_dir / 'metadata.json'
  try:
    metadata = json.loads(metadata_file.read_text())
    return {'layout': metadata.get('layout'), 'options': metadata['options']}
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
        f'{metadata_file}: cannot read the build options of this data set '
        f'({e}); delete {dataset_dir} and rebuild.') from e


def _record_name(source: types.ModuleType) -> str:
  """What a record of `source` is to its user: 'slices' or 'images'."""
  return 'slices' if source.IS_VOLUMETRIC else 'images'


def build_dataset(name: str,
                  src: str | pathlib.Path | None = None,
                  data_dir: str | pathlib.Path | None = None,
                  **options) -> pathlib.Path:
  """Builds data set `name` unless it is already built; returns its folder.

  Args:
    name: short name ('demo', 'synapse', 'acdc', 'glas', 'monuseg').
    src: folder holding the downloaded data (unused for 'demo').
    data_dir: TFDS data directory; default `default_data_dir()`.
    **options: build options of the source (e.g. synapse `val_cases`,
      `seed`); unset ones take the source's defaults.

  Returns:
    The built data set's folder, `data_dir/selfreg_NAME/VERSION`.

  Raises:
    ValueError: unknown name or option, an option the layout in `src` does
      not use, the data set is already built from another layout or with
      other options, or a source file is bad (the message names it).
    FileNotFoundError: the source folder is missing or empty or holds no
      known layout, or a source file is missing.
  """
  builder_cls = builders.builder_class(name)
  source = sources.load_source(builder_cls.SOURCE)
  manual_dir = None
  if sources.needs_source_folder(source):
    manual_dir = pathlib.Path(src).expanduser() if src is not None else None
    _check_source_folder(name, manual_dir,
                         source.MANUAL_DOWNLOAD_INSTRUCTIONS)
  elif src is not None:
    print(f'{name!r} needs no source folder; ignoring {src}.')
  data_dir = pathlib.Path(data_dir or default_data_dir()).expanduser()
  builder = builder_cls(data_dir=str(data_dir), src=manual_dir,
                        options=options, file_format='array_record')
  dataset_dir = pathlib.Path(builder.data_dir)
  build = {'layout': builder.plan.layout, 'options': builder.options}
  if (dataset_dir / 'dataset_info.json').exists():
    recorded = _recorded_build(dataset_dir)
    if recorded != build:
      raise ValueError(
          f'{dataset_dir}: already built from layout {recorded["layout"]!r} '
          f'with options {recorded["options"]}, not from {build["layout"]!r} '
          f'with {build["options"]}. Delete it or choose another data dir '
          '(--out).')
    print(f'{builder.name} is already built at {dataset_dir}.')
    return dataset_dir

  for leftover in remove_incomplete_builds(dataset_dir):
    print(f'Removed the leftover of an interrupted build: {leftover}')
  print(f'Building {builder.name} (layout: {builder.plan.layout}; options '
        f'{builder.options}) into {dataset_dir} ...')
  with (tempfile.TemporaryDirectory(prefix='selfreg_downloads_') as downloads,
        _removed_on_failure([data_dir, dataset_dir.parent])):
    builder.download_and_prepare(
        download_dir=downloads,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  counts = ', '.join(f'{split} {info.num_examples}'
                     for split, info in builder.info.splits.items())
  no_validation = ('' if 'validation' in builder.info.splits else
                   ' (no validation split)')
  print(f'Built {builder.name}: {counts} {_record_name(source)}{no_validation} '
        f'at {dataset_dir}.')
  return dataset_dir


def ensure_demo_dataset(dataset_config: ml_collections.ConfigDict) -> None:
  """Builds the synthetic demo set of config.dataset on first use (no
  download needed): what the entry points that train call before opening
  their data. Process 0 builds it; the others wait for it.
  """
  if dataset_config.name != builders.builder_class('demo').name:
    return
  if jax.process_index() == 0:
    try:
      input_pipeline.open_dataset(dataset_config.name, dataset_config.data_dir)
    except FileNotFoundError:
      build_dataset('demo', data_dir=dataset_config.data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('demo data built')


def _parse_option(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value  # A bare string.


def dataset_help(name: str) -> str:
  """What `python -m data_prep.build NAME --help` adds: the data set's
  accepted layouts and its build options with their defaults."""
  source = sources.load_source(builders.builder_class(name).SOURCE)
  summary = (source.__doc__ or source.NAME).strip().splitlines()[0]
  lines = [f'{name}: {summary}', '',
           'Accepted layouts of the source folder (--src):'
           if sources.needs_source_folder(source) else
           'Layout (no source folder is needed):']
  for layout, what in source.LAYOUTS.items():
    lines.append(_wrapped(f'- {layout}: {what}', '  ', '    '))
  lines += ['', _wrapped(
      'Build options (--option KEY=VALUE; --val-cases N and --seed N set '
      'val_cases and seed), with their defaults; an option that the layout '
      'found does not use is refused:')]
  defaults = sources.resolve_options(source, {})
  for option, description in sources.option_descriptions(source).items():
    lines.append(_wrapped(f'{option} = {defaults[option]!r}', '  ', '      '))
    lines.append(_wrapped(description, '      ', '      '))
  return '\n'.join(lines)


def _wrapped(text: str, indent: str = '', more_indent: str = '') -> str:
  """`text` in lines of at most 79 characters, broken only at spaces."""
  return textwrap.fill(text, width=79, initial_indent=indent,
                       subsequent_indent=more_indent, break_long_words=False,
                       break_on_hyphens=False)


def _argument_parser(name: str | None, add_help: bool = True
                     ) -> argparse.ArgumentParser:
  """The CLI's parser; its help describes data set `name` if given."""
  val_cases_help = ('the val_cases option: validation {} held out of '
                    'training; 0 builds no validation split')
  if name is None:
    val_cases_help = val_cases_help.format('cases (images for 2D data sets)')
    epilog = _wrapped(
        '`python -m data_prep.build NAME --help` lists the layouts and build '
        'options of data set NAME.')
  else:
    source = sources.load_source(builders.builder_class(name).SOURCE)
    val_cases_help = (
        val_cases_help.format('cases' if source.IS_VOLUMETRIC else 'images')
        if 'val_cases' in sources.option_defaults(source) else
        f'the val_cases option, which {name} does not take')
    epilog = dataset_help(name)
  parser = cli.ArgumentParser(
      prog='python -m data_prep.build',
      description=__doc__.split('\n\n', maxsplit=1)[0], epilog=epilog,
      formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help)
  parser.add_argument('name', choices=sorted(builders.BUILDERS),
                      help='data set to build')
  parser.add_argument('--src', type=pathlib.Path,
                      help='folder with the downloaded data set')
  parser.add_argument('--out', type=pathlib.Path, default=None,
                      help=f'TFDS data dir (default {default_data_dir()})')
  parser.add_argument('--val-cases', type=int, default=None,
                      help=val_cases_help)
  parser.add_argument('--seed', type=int, default=None,
                      help='the seed option (e.g. of a validation draw)')
  parser.add_argument('--option', type=_parse_option, action='append',
                      default=[], metavar='KEY=VALUE',
                      help='any build option of the data set (repeatable)')
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  try:
    named = _argument_parser(None, add_help=False).parse_known_args(argv)[0]
    name = named.name
  except cli.UserError:
    name = None  # The full parser says what is wrong, or prints the help.
  return _argument_parser(name).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  """The CLI; run it under `cli.run` to turn user errors into one line."""
  args = parse_args(argv)
  if not sys.stderr.isatty():
    # TFDS's progress bars are for terminals (where they are erased when
    # done); elsewhere they would be logged lines, e.g. before an error.
    tfds.disable_progress_bar()
  options = dict(args.option)
  if args.val_cases is not None:
    options['val_cases'] = args.val_cases
  if args.seed is not None:
    options['seed'] = args.seed
  try:
    build_dataset(args.name, args.src, args.out, **options)
  except ValueError as e:
    # A build's ValueErrors are about its input: an option, or a source file
    # (the readers turn any failure to decode one into a ValueError naming it).
    raise cli.UserError(str(e)) from e


if __name__ == '__main__':
  cli.run(main)
