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

import fixtures_sources
from data_prep import build
from data_prep import builders
from data_prep import demo
from selfreg_jax import cli
from selfreg_jax import input_pipeline

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
  with pytest.raises(ValueError, match='already built with options'):
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
  no_validation = {**TINY_OPTIONS, 'num_validation_cases': 0}
  with pytest.raises(ValueError,
                     match="'validation' split of demo holds no examples"):
    build.build_dataset('demo', data_dir=data_dir, **no_validation)
  assert sorted(p.name for p in data_dir.iterdir()) == ['other_dataset']
  assert other.read_text() == 'not ours'
  # A data set folder that was there before stays, with what it held.
  older = data_dir / DATASET_NAME / '0.9.0' / 'kept.txt'
  older.parent.mkdir(parents=True)
  older.write_text('an older version')
  with pytest.raises(ValueError, match='holds no examples'):
    build.build_dataset('demo', data_dir=data_dir, **no_validation)
  assert [p.name for p in (data_dir / DATASET_NAME).iterdir()] == ['0.9.0']
  assert older.read_text() == 'an older version'
