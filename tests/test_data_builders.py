"""Tests of the TFDS builders, the demo source and the build entry points."""

import functools
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
import fixtures_sources
from data_prep import build
from data_prep import builders
from data_prep import demo
from data_prep import sources
from data_prep.sources import acdc, synapse
from selfreg_jax.common import cli
from selfreg_jax.core import input_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A tiny demo set: a few small cases per split.
TINY_OPTIONS = dict(num_train_cases=2, num_validation_cases=1,
                    num_test_cases=1, min_slices=3, max_slices=4,
                    min_size=20, max_size=28, seed=3)
DATASET_NAME = builders.SelfregDemo.name


def _split_records(dataset_dir: pathlib.Path, split: str) -> list[dict]:
  builder = tfds.builder_from_directory(str(dataset_dir))
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def _run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.fixture(scope='module')
def tiny_demo(tmp_path_factory) -> pathlib.Path:
  data_dir = tmp_path_factory.mktemp('tfds')
  return build.build_dataset('demo', data_dir=data_dir, **TINY_OPTIONS)


def test_demo_source_follows_contract():
  examples = list(demo.generate_examples(None, 'validation', **TINY_OPTIONS))
  assert {ex['case_id'] for _, ex in examples} == {'validation_000'}
  assert len({key for key, _ in examples}) == len(examples)
  for _, ex in examples:
    assert ex['image'].dtype == demo.IMAGE_DTYPE
    assert ex['image'].shape[-1] == demo.IN_CHANNELS
    assert ex['label'].shape == ex['image'].shape[:2]
    assert ex['label'].dtype == np.uint8
    assert 0 <= ex['image'].min() and ex['image'].max() <= 1
    assert TINY_OPTIONS['min_size'] <= min(ex['label'].shape)
    assert max(ex['label'].shape) <= TINY_OPTIONS['max_size']
  labels = np.stack([ex['label'] for _, ex in examples])
  assert labels.max() < demo.NUM_CLASSES and labels.max() > 0
  assert [ex['slice_index'] for _, ex in examples] == list(range(len(examples)))


def test_demo_default_set_is_varied_and_seeded():
  first = [ex for _, ex in demo.generate_examples(None, 'test')]
  again = [ex for _, ex in demo.generate_examples(None, 'test')]
  other = [ex for _, ex in demo.generate_examples(None, 'test', seed=1)]
  assert all(np.array_equal(a['image'], b['image'])
             for a, b in zip(first, again, strict=True))
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  labels = np.concatenate([ex['label'].ravel() for ex in first])
  assert set(np.unique(labels)) == set(range(demo.NUM_CLASSES))


def test_build_writes_array_record_with_metadata(tiny_demo):
  assert tiny_demo == tiny_demo.parent.parent / DATASET_NAME / '1.0.0'
  info = json.loads((tiny_demo / 'dataset_info.json').read_text())
  assert info['fileFormat'] == 'array_record'
  for split in demo.SPLITS:
    assert (tiny_demo /
            f'{DATASET_NAME}-{split}.array_record-00000-of-00001').is_file()
  metadata = json.loads((tiny_demo / 'metadata.json').read_text())
  assert metadata == {'source': 'demo', 'num_classes': demo.NUM_CLASSES,
                      'in_channels': demo.IN_CHANNELS, 'is_volumetric': True,
                      'class_names': list(demo.CLASS_NAMES),
                      'layout': 'synthetic', 'splits': list(demo.SPLITS),
                      'options': TINY_OPTIONS}


@pytest.mark.parametrize('split', demo.SPLITS)
def test_records_read_back_equal_to_the_source(tiny_demo, split):
  records = _split_records(tiny_demo, split)
  expected = [ex for _, ex in demo.generate_examples(None, split,
                                                     **TINY_OPTIONS)]
  assert len(records) == len(expected)
  for record, ex in zip(records, expected):
    assert record['image'].dtype == np.float32
    assert record['label'].dtype == np.uint8
    np.testing.assert_array_equal(record['image'], ex['image'])
    np.testing.assert_array_equal(record['label'], ex['label'])
    assert record['case_id'].decode() == ex['case_id']
    assert record['slice_index'] == ex['slice_index']
    np.testing.assert_array_equal(record['spacing'], ex['spacing'])


def test_two_builds_write_identical_files(tiny_demo, tmp_path):
  again = build.build_dataset('demo', data_dir=tmp_path, **TINY_OPTIONS)
  record_files = sorted(p.name for p in tiny_demo.glob('*.array_record-*'))
  assert record_files == sorted(
      p.name for p in again.glob('*.array_record-*'))
  for name in record_files:
    assert (tiny_demo / name).read_bytes() == (again / name).read_bytes()


def test_build_is_idempotent_and_guards_options(tiny_demo, capsys):
  stamps = {p: p.stat().st_mtime_ns for p in tiny_demo.iterdir()}
  assert build.build_dataset('demo', data_dir=tiny_demo.parents[1],
                             **TINY_OPTIONS) == tiny_demo
  assert 'already built' in capsys.readouterr().out
  assert {p: p.stat().st_mtime_ns for p in tiny_demo.iterdir()} == stamps
  with pytest.raises(ValueError, match='already built from layout'):
    build.build_dataset('demo', data_dir=tiny_demo.parents[1],
                        **{**TINY_OPTIONS, 'seed': 4})


def test_failing_source_leaves_no_dataset_and_rebuild_works(
    tmp_path, monkeypatch):
  generate = demo.generate_examples

  @functools.wraps(generate)  # Keeps the signature that lists the options.
  def fail_midway(src, split, **options):
    for count, item in enumerate(generate(src, split, **options)):
      if count == 2:
        raise RuntimeError('source broke')
      yield item

  monkeypatch.setattr(demo, 'generate_examples', fail_midway)
  with pytest.raises(RuntimeError, match='source broke'):
    build.build_dataset('demo', data_dir=tmp_path, **TINY_OPTIONS)
  assert not (tmp_path / DATASET_NAME / '1.0.0').exists()
  with pytest.raises(FileNotFoundError, match='python -m data_prep.build'):
    input_pipeline.open_dataset(DATASET_NAME, tmp_path)

  monkeypatch.setattr(demo, 'generate_examples', generate)
  dataset_dir = build.build_dataset('demo', data_dir=tmp_path, **TINY_OPTIONS)
  assert len(_split_records(dataset_dir, 'test')) > 0


def test_killed_build_leftover_reads_as_nothing_and_is_cleaned(tmp_path):
  # A build killed mid-way (no Python cleanup) leaves TFDS's incomplete dir.
  killed = _run_python(f"""
      import functools, os, signal
      from data_prep import build, demo
      generate = demo.generate_examples
      @functools.wraps(generate)
      def die_midway(src, split, **options):
        for count, item in enumerate(generate(src, split, **options)):
          if split == 'validation':
            os.kill(os.getpid(), signal.SIGKILL)
          yield item
      demo.generate_examples = die_midway
      build.build_dataset('demo', data_dir={str(tmp_path)!r}, **{TINY_OPTIONS})
  """)
  assert killed.returncode == -9, killed.stderr
  dataset_root = tmp_path / DATASET_NAME
  leftovers = list(dataset_root.glob('incomplete.*'))
  assert len(leftovers) == 1 and any(leftovers[0].iterdir())
  assert not (dataset_root / '1.0.0').exists()
  with pytest.raises(FileNotFoundError, match='is not built'):
    input_pipeline.open_dataset(DATASET_NAME, tmp_path)

  dataset_dir = build.build_dataset('demo', data_dir=tmp_path, **TINY_OPTIONS)
  assert not list(dataset_root.glob('incomplete.*'))
  assert len(_split_records(dataset_dir, 'validation')) > 0


def test_build_does_not_import_tensorflow(tmp_path):
  result = _run_python(f"""
      import sys
      from data_prep import build
      build.build_dataset('demo', data_dir={str(tmp_path)!r}, **{TINY_OPTIONS})
      print('tensorflow imported:', 'tensorflow' in sys.modules)
  """)
  assert result.returncode == 0, result.stderr
  assert 'tensorflow imported: False' in result.stdout


def test_check_example_rejects_bad_labels():
  _, example = next(demo.generate_examples(None, 'test', **TINY_OPTIONS))
  bad = {**example, 'label': np.full_like(example['label'], demo.NUM_CLASSES)}
  with pytest.raises(ValueError, match="example 'k'.*not below NUM_CLASSES"):
    builders.check_example('k', bad, demo)
  bad = {**example, 'label': example['label'][1:]}
  with pytest.raises(ValueError, match="example 'k': label has shape"):
    builders.check_example('k', bad, demo)


def test_unknown_name_and_option_errors(tmp_path):
  with pytest.raises(ValueError, match='valid names: demo, synapse'):
    build.build_dataset('nonesuch', data_dir=tmp_path)
  with pytest.raises(ValueError,
                     match=r"unknown build option\(s\) \['bogus'\]"):
    build.build_dataset('demo', data_dir=tmp_path, bogus=1)


def test_real_data_set_needs_an_existing_source_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='pass its folder with --src'):
    build.build_dataset('monuseg', data_dir=tmp_path)
  missing = tmp_path / 'not_downloaded'
  with pytest.raises(FileNotFoundError, match=f'{missing}: source folder'):
    build.build_dataset('monuseg', src=missing, data_dir=tmp_path)
  assert not (tmp_path / 'selfreg_monuseg').exists()


def test_cli(tmp_path, capsys):
  options = [f'--option={k}={v}' for k, v in TINY_OPTIONS.items()]
  assert build.main(['demo', '--out', str(tmp_path), *options]) is None
  out = capsys.readouterr().out
  assert f'Built {DATASET_NAME}' in out and str(tmp_path) in out
  assert (tmp_path / DATASET_NAME / '1.0.0' / 'dataset_info.json').is_file()
  error, _ = _cli_error(['demo', '--out', str(tmp_path), '--val-cases', '2'],
                        capsys)
  assert "unknown build option(s) ['val_cases']" in error
  error, _ = _cli_error(['nonesuch'], capsys)
  assert error.startswith("argument name: invalid choice: 'nonesuch'")


def _cli_error(argv, capsys) -> tuple[str, str]:
  """The one `error: ` line (less the prefix) of the build CLI on `argv`,
  and what it printed on stdout."""
  with pytest.raises(SystemExit) as exit_info:
    cli.run(build.main, argv)
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0].removeprefix('error: '), captured.out


@pytest.mark.parametrize('name', ['synapse', 'acdc', 'glas', 'monuseg'])
def test_cli_refuses_an_empty_source_folder_and_leaves_nothing(
    name, tmp_path, capsys):
  empty, data_dir = tmp_path / 'downloaded', tmp_path / 'tfds'
  empty.mkdir()
  error, out = _cli_error(
      [name, '--src', str(empty), '--out', str(data_dir)], capsys)
  assert error == (f'{empty}: source folder of {name!r} is empty; the '
                   'download instructions are printed above.')
  assert f'python -m data_prep.build {name} --src' in out
  assert not data_dir.exists()


def test_cli_refuses_an_empty_split_folder_and_leaves_nothing(tmp_path,
                                                              capsys):
  src, data_dir = tmp_path / 'GlaS', tmp_path / 'tfds'
  fixtures_sources.write_split_folders(src, {'train': 2, 'test': 1})
  for folder in ('img', 'labelcol'):
    (src / 'Val_Folder' / folder).mkdir(parents=True)
  error, _ = _cli_error(['glas', '--src', str(src), '--out', str(data_dir)],
                        capsys)
  assert error == (f"{src / 'Val_Folder'}: the 'validation' split is empty "
                   '(no pictures in img/ nor masks in labelcol/).')
  assert not data_dir.exists()


def test_failed_build_removes_only_the_folders_it_created(tmp_path):
  data_dir = tmp_path / 'tfds'
  other = data_dir / 'other_dataset' / 'kept.txt'
  other.parent.mkdir(parents=True)
  other.write_text('not ours')
  no_test = {**TINY_OPTIONS, 'num_test_cases': 0}
  with pytest.raises(ValueError,
                     match="'test' split of demo holds no examples"):
    build.build_dataset('demo', data_dir=data_dir, **no_test)
  assert sorted(p.name for p in data_dir.iterdir()) == ['other_dataset']
  assert other.read_text() == 'not ours'
  # A data set folder that was there before stays, with what it held.
  older = data_dir / DATASET_NAME / '0.9.0' / 'kept.txt'
  older.parent.mkdir(parents=True)
  older.write_text('an older version')
  with pytest.raises(ValueError, match='holds no examples'):
    build.build_dataset('demo', data_dir=data_dir, **no_test)
  assert [p.name for p in (data_dir / DATASET_NAME).iterdir()] == ['0.9.0']
  assert older.read_text() == 'an older version'


def _metadata(dataset_dir: pathlib.Path) -> dict:
  return json.loads((dataset_dir / 'metadata.json').read_text())


def test_build_without_validation_has_no_validation_split(tmp_path, capsys):
  options = {**TINY_OPTIONS, 'num_validation_cases': 0}
  dataset_dir = build.build_dataset('demo', data_dir=tmp_path, **options)
  counts = {split: len(list(demo.generate_examples(None, split, **options)))
            for split in ('train', 'test')}
  assert (f'Built {DATASET_NAME}: train {counts["train"]}, test '
          f'{counts["test"]} slices (no validation split) at {dataset_dir}.'
          in capsys.readouterr().out)
  builder = tfds.builder_from_directory(str(dataset_dir))
  assert sorted(builder.info.splits) == ['test', 'train']
  assert _metadata(dataset_dir)['splits'] == ['train', 'test']
  config = base.dataset_config('demo')
  config.data_dir = str(tmp_path)
  with pytest.raises(cli.UserError) as info:
    next(input_pipeline.iterate_cases(input_pipeline.DataSet.open(config),
                                      'validation'))
  assert str(info.value) == (f"{dataset_dir}: no split 'validation'; "
                             "available: ['test', 'train'].")


# The published class order of each set (the papers' tables); foreground
# classes only. Binary sets name none and read as 'foreground'.
FOREGROUND_CLASS_NAMES = {
    'synapse': ('aorta', 'gallbladder', 'left kidney', 'right kidney',
                'liver', 'pancreas', 'spleen', 'stomach'),
    'acdc': ('right ventricle', 'myocardium', 'left ventricle'),
    'glas': ('foreground',),
    'monuseg': ('foreground',),
}
# Data set -> (writer of a tiny source folder, training and test records of
# a build without validation, what a record is).
ZERO_VALIDATION_SOURCES = {
    'synapse': (lambda src: fixtures_sources.write_transunet_copy(
        src, synapse.TRAIN_CASES, synapse.TEST_CASES),
                len(synapse.TRAIN_CASES) * fixtures_sources.SLICES_PER_CASE,
                len(synapse.TEST_CASES) * fixtures_sources.TEST_VOLUME_DEPTH,
                'slices'),
    'acdc': (lambda src: fixtures_sources.write_acdc_npz(
        src, {'train': (1, 3), 'validation': (4,), 'test': (2,)}),
             3 * 2, 2 * fixtures_sources.TEST_VOLUME_DEPTH, 'slices'),
    'glas': (lambda src: fixtures_sources.write_split_folders(
        src, {'train': 3, 'test': 1}, instance_ids=True), 3, 1, 'images'),
    'monuseg': (lambda src: fixtures_sources.write_monuseg_release(
        src, ['TCGA-TRAIN-0', 'TCGA-TRAIN-1'], ['TCGA-TEST-0']),
                2, 1, 'images'),
}


@pytest.mark.parametrize('name', sorted(ZERO_VALIDATION_SOURCES))
def test_cli_builds_without_validation(name, tmp_path, capsys):
  write, num_train, num_test, unit = ZERO_VALIDATION_SOURCES[name]
  src, data_dir = tmp_path / 'downloaded', tmp_path / 'tfds'
  write(src)
  build.main([name, '--src', str(src), '--out', str(data_dir),
              '--val-cases', '0'])
  dataset_dir = data_dir / f'selfreg_{name}' / '1.0.0'
  ours = [line for line in capsys.readouterr().out.splitlines()
          if line.startswith('Buil')]
  assert ours[-1] == (f'Built selfreg_{name}: train {num_train}, test '
                      f'{num_test} {unit} (no validation split) at '
                      f'{dataset_dir}.')
  assert unit == 'slices' or not any('slice' in line for line in ours)
  builder = tfds.builder_from_directory(str(dataset_dir))
  assert sorted(builder.info.splits) == ['test', 'train']
  metadata = _metadata(dataset_dir)
  assert metadata['splits'] == ['train', 'test']
  assert metadata['options'] == {'val_cases': 0}
  dataset_config = base.dataset_config(name)
  dataset_config.data_dir = str(data_dir)
  opened = input_pipeline.DataSet.open(dataset_config)
  assert opened.class_names == FOREGROUND_CLASS_NAMES[name]


@pytest.mark.parametrize('name', sorted(builders.BUILDERS))
def test_cli_help_lists_layouts_and_options(name, capsys):
  with pytest.raises(SystemExit) as exit_info:
    build.main([name, '--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  flat = ' '.join(out.split())  # Undoes the wrapping.
  source = sources.load_source(name)
  for layout, what in source.LAYOUTS.items():
    assert f'- {layout}: {what}' in flat
  descriptions = sources.option_descriptions(source)
  for option, default in sources.resolve_options(source, {}).items():
    assert descriptions[option]
    assert f'{option} = {default!r} {descriptions[option]}' in flat
  if not source.IS_VOLUMETRIC:
    assert 'slice' not in out.lower()


def test_cli_glas_train_test_folders_and_refused_options(tmp_path, capsys):
  train_test, split_folders = tmp_path / 'GlaS', tmp_path / 'GlaS_uctransnet'
  data_dir = tmp_path / 'tfds'
  fixtures_sources.write_split_folders(train_test, {'train': 4, 'test': 1},
                                       instance_ids=True)
  build.main(['glas', '--src', str(train_test), '--out', str(data_dir),
              '--val-cases', '1', '--seed', '2'])
  dataset_dir = data_dir / 'selfreg_glas' / '1.0.0'
  assert (f'Built selfreg_glas: train 3, validation 1, test 1 images at '
          f'{dataset_dir}.' in capsys.readouterr().out)
  metadata = _metadata(dataset_dir)
  assert metadata['layout'] == 'train/test folders'
  assert metadata['options'] == {'val_cases': 1, 'seed': 2}

  fixtures_sources.write_split_folders(
      split_folders, {'train': 2, 'validation': 1, 'test': 1})
  error, _ = _cli_error(['glas', '--src', str(split_folders), '--out',
                         str(data_dir), '--val-cases', '1'], capsys)
  assert error == (
      f"{split_folders}: build option 'val_cases' does not apply to this glas "
      'build (layout: split folders): the validation images are those of '
      'Val_Folder/ (without that folder they are held out of Train_Folder/).')
  error, _ = _cli_error(['glas', '--src', str(split_folders), '--out',
                         str(data_dir)], capsys)
  assert error == (
      f"{dataset_dir}: already built from layout 'train/test folders' with "
      "options {'val_cases': 1, 'seed': 2}, not from 'split folders' with {}. "
      'Delete it or choose another data dir (--out).')


@pytest.fixture(scope='module')
def acdc_release_and_copy(tmp_path_factory) -> pathlib.Path:
  """The raw release's 100 training patients, and the npz copy laid out by
  the reference lists, under ROOT/raw and ROOT/copy."""
  root = tmp_path_factory.mktemp('acdc_sources')
  fixtures_sources.write_acdc_raw(
      root / 'raw', num_patients=fixtures_sources.ACDC_RELEASE_PATIENTS,
      shape_xyz=fixtures_sources.ACDC_RELEASE_SHAPE_XYZ)
  fixtures_sources.write_acdc_npz(root / 'copy', {
      split: [int(p.removeprefix('patient')) for p in patients]
      for split, patients in acdc.REFERENCE_PATIENTS.items()})
  return root


def _patients_by_split(dataset_dir: pathlib.Path) -> dict[str, set[str]]:
  builder = tfds.builder_from_directory(str(dataset_dir))
  return {split: {record['case_id'].decode().split('_')[0]
                  for record in _split_records(dataset_dir, split)}
          for split in builder.info.splits}


def test_acdc_raw_and_copy_builds_give_the_same_split(acdc_release_and_copy,
                                                     tmp_path):
  patients = {
      layout: _patients_by_split(build.build_dataset(
          'acdc', acdc_release_and_copy / layout, tmp_path / layout))
      for layout in ('raw', 'copy')}
  assert patients['raw'] == patients['copy']
  assert {split: len(p) for split, p in patients['raw'].items()} == {
      'train': 70, 'validation': 10, 'test': 20}
  # First and last entries of lists_ACDC/{valid,test}.txt.
  assert {'patient019', 'patient080'} <= patients['raw']['validation']
  assert {'patient002', 'patient095'} <= patients['raw']['test']


def test_entry_points_build_the_demo_set_once_and_no_other(tmp_path, capsys):
  """What main.py and the sweep call first: the demo set is built where
  config.dataset points when it is absent, reused when present, and other
  data sets are never built."""
  config = base.dataset_config('demo')
  config.data_dir = str(tmp_path)
  build.ensure_demo_dataset(config)
  assert capsys.readouterr().out.count(f'Built {DATASET_NAME}:') == 1
  assert input_pipeline.DataSet.open(config).class_names == (
      demo.CLASS_NAMES[1:])
  build.ensure_demo_dataset(config)
  assert 'Buil' not in capsys.readouterr().out
  other = base.dataset_config('glas')
  other.data_dir = str(tmp_path / 'elsewhere')
  build.ensure_demo_dataset(other)
  assert not (tmp_path / 'elsewhere').exists()
