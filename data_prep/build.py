"""Builds a data set into TFDS's ArrayRecord format.

  python -m data_prep.build demo
  python -m data_prep.build synapse --src ~/data/Synapse --val-cases 4
  python -m data_prep.build monuseg --src ~/data/MoNuSeg --out /data/tfds
  python -m data_prep.build glas --src ~/data/GlaS --option seed=1

The result lands in `DATA_DIR/selfreg_NAME/VERSION/` (DATA_DIR defaults to
$TFDS_DATA_DIR or ~/tensorflow_datasets). Building is idempotent: a data set
that is already built with the same options is left as it is. TFDS writes
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
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from data_prep import builders
from data_prep import sources
from selfreg_jax import cli


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


def _recorded_options(dataset_dir: pathlib.Path) -> dict[str, Any]:
  metadata_file = dataset_dir / 'metadata.json'
  try:
    return json.loads(metadata_file.read_text())['options']
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(
        f'{metadata_file}: cannot read the build options of this data set '
        f'({e}); delete {dataset_dir} and rebuild.') from e


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
    ValueError: unknown name or option, the data set is already built with
      other options, or a source file is bad (the message names it).
    FileNotFoundError: the source folder is missing or empty, or a source file
      is missing.
  """
  builder_cls = builders.builder_class(name)
  data_dir = pathlib.Path(data_dir or default_data_dir()).expanduser()
  builder = builder_cls(data_dir=str(data_dir), options=options,
                        file_format='array_record')
  dataset_dir = pathlib.Path(builder.data_dir)
  if (dataset_dir / 'dataset_info.json').exists():
    recorded = _recorded_options(dataset_dir)
    if recorded != builder.options:
      raise ValueError(
          f'{dataset_dir}: already built with options {recorded}, not '
          f'{builder.options}. Delete it or choose another data dir (--out).')
    print(f'{builder.name} is already built at {dataset_dir}.')
    return dataset_dir

  manual_dir = None
  if sources.needs_source_folder(builder.source):
    manual_dir = pathlib.Path(src).expanduser() if src is not None else None
    _check_source_folder(name, manual_dir,
                         builder.source.MANUAL_DOWNLOAD_INSTRUCTIONS)
  elif src is not None:
    print(f'{name!r} needs no source folder; ignoring {src}.')
  for leftover in remove_incomplete_builds(dataset_dir):
    print(f'Removed the leftover of an interrupted build: {leftover}')
  print(f'Building {builder.name} (options {builder.options}) '
        f'into {dataset_dir} ...')
  with (tempfile.TemporaryDirectory(prefix='selfreg_downloads_') as downloads,
        _removed_on_failure([data_dir, dataset_dir.parent])):
    builder.download_and_prepare(
        download_dir=downloads,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  counts = ', '.join(f'{split} {info.num_examples}'
                     for split, info in builder.info.splits.items())
  print(f'Built {builder.name}: {counts} slices at {dataset_dir}.')
  return dataset_dir


def _parse_option(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value  # A bare string.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = cli.ArgumentParser(
      prog='python -m data_prep.build',
      description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument('name', choices=sorted(builders.BUILDERS),
                      help='data set to build')
  parser.add_argument('--src', type=pathlib.Path,
                      help='folder with the downloaded data set')
  parser.add_argument('--out', type=pathlib.Path, default=None,
                      help=f'TFDS data dir (default {default_data_dir()})')
  parser.add_argument('--val-cases', type=int, default=None,
                      help='validation cases held out of training '
                      '(sources that take a `val_cases` option)')
  parser.add_argument('--seed', type=int, default=None,
                      help='seed of the source (e.g. of the validation split)')
  parser.add_argument('--option', type=_parse_option, action='append',
                      default=[], metavar='KEY=VALUE',
                      help='any other build option of the source (repeatable)')
  return parser.parse_args(argv)


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
