"""Source readers on tiny copies of each layout, written in the real formats."""

import io
import itertools
import pathlib
import zipfile

import numpy as np
import pytest

import fixtures_sources as fx
from data_prep import sources
from data_prep.sources import acdc, common, glas, monuseg, synapse

MODULES = (synapse, acdc, glas, monuseg)
REAL_MONUSEG = (pathlib.Path(__file__).resolve().parents[2] / 'shared' /
                'data' / 'MoNuSeg')
# BTCV raw organ id -> Synapse class, written out independently of the reader.
BTCV_TO_SYNAPSE = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
ZYX_SPACING = fx.VOXEL_SIZE_XYZ[::-1]


def collect(examples):
  """Materialises (key, example) pairs, checking the keys are unique."""
  pairs = list(examples)
  keys = [key for key, _ in pairs]
  assert len(keys) == len(set(keys))
  return pairs


def check_contract(module, example):
  image, label, spacing = example['image'], example['label'], example['spacing']
  assert image.ndim == 3 and image.shape[-1] == module.IN_CHANNELS
  assert image.dtype == module.IMAGE_DTYPE
  assert label.shape == image.shape[:2] and label.dtype == np.uint8
  assert label.max() < module.NUM_CLASSES
  assert spacing.shape == (3,) and spacing.dtype == np.float32
  assert isinstance(example['case_id'], str)
  assert isinstance(example['slice_index'], int)


def corrupt(path: pathlib.Path) -> None:
  path.write_bytes(b'this is not a valid file' * 4)


def raised(kind, generate, *args, **kwargs) -> str:
  """The message of the `kind` error raised by reading `generate(...)`.

  The error may come from the call itself (e.g. an unrecognised folder) or
  while the examples are read.
  """
  with pytest.raises(kind) as info:
    collect(generate(*args, **kwargs))
  return str(info.value)


@pytest.mark.parametrize('module', MODULES, ids=lambda m: m.NAME)
def test_contract_attributes(module):
  assert sources.load_source(module.NAME) is module
  assert module.SPLITS == ('train', 'validation', 'test')
  assert module.IS_VOLUMETRIC == (module.IN_CHANNELS == 1)
  instructions = module.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert f'python -m data_prep.build {module.NAME} --src' in instructions
  assert all(layout in instructions for layout in module.LAYOUTS)
  # Every option has a JSON-able default, as the builders require.
  assert set(sources.resolve_options(module, {})) >= {'seed'}


@pytest.mark.parametrize('module', MODULES, ids=lambda m: m.NAME)
def test_unrecognised_folder_names_folder_and_layouts(module, tmp_path):
  (tmp_path / 'notes.txt').write_text('nothing here')
  with pytest.raises(FileNotFoundError) as info:
    module.generate_examples(tmp_path, 'train')
  message = str(info.value)
  assert str(tmp_path) in message and '\n' not in message
  for layout in module.LAYOUTS:
    assert layout in message


@pytest.mark.parametrize('module', MODULES, ids=lambda m: m.NAME)
def test_missing_source_and_bad_split(module, tmp_path):
  with pytest.raises(FileNotFoundError, match='Where to get it'):
    module.generate_examples(None, 'train')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    module.generate_examples(tmp_path / 'absent', 'train')
  with pytest.raises(ValueError, match='Unknown split'):
    module.generate_examples(tmp_path, 'dev')


# ----------------------------------------------------------------------------
# Synapse.

SYNAPSE_VAL = 2


def test_synapse_case_splits():
  splits = synapse.case_splits(val_cases=SYNAPSE_VAL)
  train_cases, test_cases = set(synapse.TRAIN_CASES), set(synapse.TEST_CASES)
  assert len(train_cases) == 18 and len(test_cases) == 12
  assert len(splits['validation']) == SYNAPSE_VAL
  assert len(splits['train']) == len(train_cases) - SYNAPSE_VAL
  assert set(splits['train']) | set(splits['validation']) == train_cases
  assert not set(splits['train']) & set(splits['validation'])
  assert splits['test'] == synapse.TEST_CASES
  assert synapse.case_splits(val_cases=SYNAPSE_VAL, seed=0) == splits
  drawn = {synapse.case_splits(val_cases=4, seed=s)['validation']
           for s in range(5)}
  assert len(drawn) > 1 and all(len(v) == 4 for v in drawn)
  assert all(not set(v) & test_cases for v in drawn)
  chosen = synapse.case_splits(val_cases=['case0040', 'case0005'])
  assert chosen['validation'] == ('case0005', 'case0040')
  assert synapse.case_splits(val_cases='case0040')['validation'] == (
      'case0040',)
  with pytest.raises(ValueError, match='case0001'):
    synapse.case_splits(val_cases=('case0001',))


@pytest.fixture(scope='module')
def btcv_raw(tmp_path_factory):
  """All 30 cases, under RawData/Training/ as the release unzips."""
  src = tmp_path_factory.mktemp('btcv')
  numbers = [int(c[4:]) for c in synapse.TRAIN_CASES + synapse.TEST_CASES]
  written = fx.write_btcv_raw(src / 'RawData' / 'Training', numbers)
  return src, written


def test_synapse_raw_slices_scaled_and_remapped(btcv_raw):
  src, written = btcv_raw
  pairs = collect(synapse.generate_examples(src, 'validation', val_cases=1))
  width, height, depth = fx.VOLUME_SHAPE_XYZ
  assert len(pairs) == depth
  (case_id,) = synapse.case_splits(val_cases=1)['validation']
  hu, raw = written[case_id]
  hu_zyx, raw_zyx = hu.transpose(2, 1, 0), raw.transpose(2, 1, 0)
  expected_label = np.zeros_like(raw_zyx)
  for raw_id, cls in BTCV_TO_SYNAPSE.items():
    expected_label[raw_zyx == raw_id] = cls
  for index, (key, example) in enumerate(pairs):
    check_contract(synapse, example)
    assert key == f'{case_id}_slice{index:03d}'
    assert example['case_id'] == case_id and example['slice_index'] == index
    assert example['image'].shape == (height, width, 1)
    expected = (np.clip(hu_zyx[index], -125, 275) + 125) / 400
    np.testing.assert_allclose(example['image'][..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(example['label'], expected_label[index])
    np.testing.assert_allclose(example['spacing'], ZYX_SPACING, rtol=1e-6)
  images = np.stack([e['image'] for _, e in pairs])
  assert images.min() == 0.0 and images.max() == 1.0
  labels = np.stack([e['label'] for _, e in pairs])
  assert set(np.unique(labels)) == set(range(synapse.NUM_CLASSES))


def test_synapse_raw_split_membership(btcv_raw):
  src, _ = btcv_raw
  options = sources.resolve_options(synapse, {})  # As the builders pass them.
  cases = {split: {e['case_id'] for _, e in
                   synapse.generate_examples(src, split, **options)}
           for split in synapse.SPLITS}
  assert cases['test'] == set(synapse.TEST_CASES)
  assert cases['train'] | cases['validation'] == set(synapse.TRAIN_CASES)
  assert not cases['test'] & (cases['train'] | cases['validation'])
  assert not cases['train'] & cases['validation']


def test_synapse_transunet_copy(tmp_path):
  written = fx.write_transunet_copy(
      tmp_path, synapse.TRAIN_CASES, synapse.TEST_CASES)
  splits = synapse.case_splits()

  def check_slices(pairs):
    for key, example in pairs:
      check_contract(synapse, example)
      image, label = written[example['case_id']]
      index = example['slice_index']
      assert key == f'{example["case_id"]}_slice{index:03d}'
      np.testing.assert_array_equal(example['image'][..., 0], image[index])
      np.testing.assert_array_equal(example['label'], label[index])
      np.testing.assert_array_equal(example['spacing'], np.ones(3))

  train = collect(synapse.generate_examples(tmp_path, 'train'))
  assert len(train) == len(splits['train']) * fx.SLICES_PER_CASE
  assert {e['case_id'] for _, e in train} == set(splits['train'])
  check_slices(train)
  validation = collect(synapse.generate_examples(tmp_path, 'validation'))
  assert {e['case_id'] for _, e in validation} == set(splits['validation'])
  test = collect(synapse.generate_examples(tmp_path, 'test'))
  assert len(test) == len(synapse.TEST_CASES) * fx.TEST_VOLUME_DEPTH
  assert {e['case_id'] for _, e in test} == set(synapse.TEST_CASES)
  check_slices(test)


def test_synapse_transunet_copy_rejects_leaks_and_gaps(tmp_path):
  fx.write_transunet_copy(
      tmp_path, synapse.TRAIN_CASES[:-1], synapse.TEST_CASES[:1])
  assert synapse.TRAIN_CASES[-1] in raised(
      FileNotFoundError, synapse.generate_examples, tmp_path, 'train',
      val_cases=0)
  assert synapse.TEST_CASES[1] in raised(
      FileNotFoundError, synapse.generate_examples, tmp_path, 'test')
  leaked = tmp_path / 'train_npz' / f'{synapse.TEST_CASES[0]}_slice000.npz'
  np.savez(leaked, image=np.zeros(fx.SLICE_HW), label=np.zeros(fx.SLICE_HW))
  message = raised(ValueError, synapse.generate_examples, tmp_path,
                   'validation')
  assert str(leaked) in message and 'a test case' in message


def test_synapse_transunet_copy_bad_files(tmp_path):
  fx.write_transunet_copy(tmp_path, synapse.TRAIN_CASES, ())
  path = tmp_path / 'train_npz' / f'{synapse.TRAIN_CASES[0]}_slice000.npz'

  def message():
    return raised(ValueError, synapse.generate_examples, tmp_path, 'train',
                  val_cases=[synapse.TRAIN_CASES[1]])

  zeros = np.zeros(fx.SLICE_HW)
  np.savez(path, image=zeros, label=np.full(fx.SLICE_HW, 9.0))
  assert str(path) in message() and '[0, 9)' in message()
  np.savez(path, image=zeros, label=np.full(fx.SLICE_HW, 0.5))
  assert str(path) in message() and 'non-integer' in message()
  np.savez(path, image=np.full(fx.SLICE_HW, np.nan), label=zeros)
  assert str(path) in message() and 'NaN' in message()
  np.savez(path, image=zeros, mask=zeros)
  assert str(path) in message() and "lacks arrays ['label']" in message()
  header = io.BytesIO()  # Claims a 4 TiB image and holds no data.
  np.lib.format.write_array_header_1_0(
      header, {'descr': '<f4', 'fortran_order': False, 'shape': (2**40,)})
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('image.npy', header.getvalue())
  assert str(path) in message() and 'claims' in message()
  corrupt(path)
  assert str(path) in message() and 'unreadable' in message()


@pytest.fixture
def small_btcv(tmp_path):
  """Raw BTCV holding only two cases, for the error tests."""
  fx.write_btcv_raw(tmp_path, (5, 6))
  return tmp_path


def synapse_validation(src):
  return synapse.generate_examples(src, 'validation', val_cases=['case0005'])


def test_synapse_raw_errors_name_the_file(small_btcv):
  src = small_btcv
  label = src / 'label' / 'label0005.nii.gz'
  fx.write_nifti(label, np.full(fx.VOLUME_SHAPE_XYZ, 14, np.uint8))
  message = raised(ValueError, synapse_validation, src)
  assert str(label) in message and '[0, 14)' in message
  fx.write_nifti(label, np.zeros((8, 8, 4), np.uint8))
  message = raised(ValueError, synapse_validation, src)
  assert str(label) in message and 'does not match' in message
  corrupt(label)
  message = raised(ValueError, synapse_validation, src)
  assert str(label) in message and 'unreadable' in message
  label.unlink()
  message = raised(FileNotFoundError, synapse_validation, src)
  assert str(src / 'img' / 'img0005.nii.gz') in message
  assert 'has no label' in message
  (src / 'img' / 'img0006.nii.gz').unlink()
  (src / 'img' / 'img0005.nii.gz').unlink()
  message = raised(FileNotFoundError, synapse_validation, src)
  assert str(src / 'label' / 'label0006.nii.gz') in message
  assert 'has no CT volume' in message


def test_synapse_raw_missing_case(small_btcv):
  assert 'case0007' in raised(
      FileNotFoundError, synapse.generate_examples, small_btcv, 'validation',
      val_cases=['case0007'])


# ----------------------------------------------------------------------------
# ACDC.

ACDC_FRACTIONS = (0.7, 0.1, 0.2)
ACDC_PATIENTS = [f'patient{n:03d}' for n in range(1, 101)]
SEEDED = {'patient_split': 'seeded'}


@pytest.fixture(scope='module')
def acdc_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp('acdc')
  return root, fx.write_acdc_raw(root)


def test_acdc_seeded_patient_splits_are_seeded_and_disjoint():
  splits = acdc.seeded_patient_splits(ACDC_PATIENTS)
  assert [len(splits[s]) for s in acdc.SPLITS] == [
      round(f * len(ACDC_PATIENTS)) for f in ACDC_FRACTIONS]
  assert set().union(*splits.values()) == set(ACDC_PATIENTS)
  assert acdc.seeded_patient_splits(ACDC_PATIENTS[::-1]) == splits
  assert acdc.seeded_patient_splits(ACDC_PATIENTS, seed=1) != splits
  with pytest.raises(ValueError, match='summing to 1'):
    acdc.seeded_patient_splits(ACDC_PATIENTS, (0.5, 0.1, 0.1))


def test_acdc_reference_patients_are_the_copy_lists():
  reference = acdc.REFERENCE_PATIENTS
  # 70/10/20 of the 100 training patients (docs/design.md), disjoint.
  assert [len(reference[s]) for s in acdc.SPLITS] == [70, 10, 20]
  assert sorted(sum(reference.values(), ())) == ACDC_PATIENTS
  # First and last entries of lists_ACDC/{train,valid,test}.txt.
  assert reference['train'][::69] == ('patient001', 'patient100')
  assert reference['validation'][::9] == ('patient019', 'patient080')
  assert reference['test'][::19] == ('patient002', 'patient095')
  present = ACDC_PATIENTS[::-1]  # In any order.
  assert acdc.reference_patient_splits(
      pathlib.Path('ACDC'), present, reference['validation'], seed=0) == {
          split: tuple(sorted(reference[split])) for split in acdc.SPLITS}
  no_validation = acdc.reference_patient_splits(pathlib.Path('ACDC'), present,
                                                0, seed=0)
  assert no_validation == {
      'train': tuple(sorted(reference['train'] + reference['validation'])),
      'validation': (), 'test': tuple(sorted(reference['test']))}


def test_acdc_reference_split_needs_every_patient(acdc_raw):
  src, _ = acdc_raw
  message = raised(FileNotFoundError, acdc.generate_examples, src, 'test')
  assert message == (
      f'{src}: the reference patient split needs the 100 patients of '
      f'training/, and 90 are missing (\'patient011\' .. \'patient100\'); '
      'to split the patients present, build with --option '
      'patient_split=seeded.')


def test_acdc_raw_frames(acdc_raw):
  src, written = acdc_raw
  cases = {}
  for split in acdc.SPLITS:
    for key, example in collect(acdc.generate_examples(src, split, **SEEDED)):
      check_contract(acdc, example)
      cases.setdefault(split, set()).add(example['case_id'])
      mri, gt = written[example['case_id']]
      index = example['slice_index']
      assert key == f'{example["case_id"]}_slice{index:03d}'
      mri_zyx = mri.transpose(2, 1, 0).astype(np.float64)
      expected = (mri_zyx[index] - mri.min()) / (mri.max() - mri.min())
      np.testing.assert_allclose(example['image'][..., 0], expected, atol=1e-6)
      np.testing.assert_array_equal(
          example['label'], gt.transpose(2, 1, 0)[index])
      np.testing.assert_allclose(example['spacing'], ZYX_SPACING, rtol=1e-6)
  patients = {s: {c.split('_')[0] for c in cases[s]} for s in acdc.SPLITS}
  assert [len(patients[s]) for s in acdc.SPLITS] == [
      round(f * fx.ACDC_PATIENTS) for f in ACDC_FRACTIONS]
  assert set().union(*patients.values()) == {
      f'patient{n:03d}' for n in range(1, fx.ACDC_PATIENTS + 1)}
  assert not patients['test'] & (patients['train'] | patients['validation'])
  assert not patients['train'] & patients['validation']
  assert cases['test'] == {f'{p}_frame{f:02d}' for p in patients['test']
                           for f in fx.ACDC_FRAMES}


def test_acdc_raw_without_info_cfg_uses_file_names(tmp_path):
  written = fx.write_acdc_raw(tmp_path, num_patients=3, with_info=False)
  cases = {e['case_id'] for split in acdc.SPLITS
           for _, e in acdc.generate_examples(tmp_path, split, **SEEDED)}
  assert cases == set(written)


def test_acdc_raw_testing_folder_is_opt_in(tmp_path):
  training = fx.write_acdc_raw(tmp_path, num_patients=2)
  testing = fx.write_acdc_raw(tmp_path, num_patients=1, part='testing',
                              first_patient=fx.ACDC_PATIENTS + 1)

  def cases(**options):
    return {e['case_id'] for split in acdc.SPLITS
            for _, e in acdc.generate_examples(tmp_path, split, **SEEDED,
                                               **options)}

  assert cases() == set(training)
  assert cases(include_testing=True) == set(training) | set(testing)


def test_acdc_raw_errors_name_the_file(tmp_path):
  fx.write_acdc_raw(tmp_path, num_patients=1)
  folder = tmp_path / 'training' / 'patient001'

  def message(kind):
    return raised(kind, acdc.generate_examples, tmp_path, 'train', **SEEDED,
                  split_fractions=(1.0, 0.0, 0.0))

  gt = folder / 'patient001_frame01_gt.nii.gz'
  fx.write_nifti(gt, np.full(fx.VOLUME_SHAPE_XYZ, 4, np.uint8))
  assert str(gt) in message(ValueError) and '[0, 4)' in message(ValueError)
  gt.unlink()
  assert str(gt) in message(FileNotFoundError)
  assert 'ground truth' in message(FileNotFoundError)
  image = folder / 'patient001_frame07.nii.gz'
  fx.write_nifti(image, np.full(fx.VOLUME_SHAPE_XYZ, 7, np.int16))
  (folder / 'Info.cfg').write_text('ED: 7\nES: 7\n')
  assert str(image) in message(ValueError)
  assert 'intensity range' in message(ValueError)
  (folder / 'Info.cfg').write_text('ED: first\n')
  assert str(folder / 'Info.cfg') in message(ValueError)
  assert '"ED: <frame>"' in message(ValueError)


def test_acdc_npz_copy(tmp_path):
  patients = {'train': (1, 3), 'validation': (4,), 'test': (2,)}
  written = fx.write_acdc_npz(tmp_path, patients)
  for split, numbers in patients.items():
    pairs = collect(acdc.generate_examples(tmp_path, split,
                                           val_cases=['patient004']))
    expected_cases = {f'patient{n:03d}_{phase}' for n in numbers
                      for phase in ('ED', 'ES')}
    assert {e['case_id'] for _, e in pairs} == expected_cases
    depth = fx.TEST_VOLUME_DEPTH if split == 'test' else 1
    assert len(pairs) == len(expected_cases) * depth
    for key, example in pairs:
      check_contract(acdc, example)
      number, phase = example['case_id'][7:10], example['case_id'][-2:]
      index = example['slice_index']
      if split == 'test':
        img = written[f'case_{number}_volume_{phase}.npz'][index]
      else:
        img = written[f'case_{number}_slice{phase}_0.npz']
      np.testing.assert_array_equal(example['image'][..., 0], img)
      assert key == f'{example["case_id"]}_slice{index:03d}'


def test_acdc_npz_copy_without_lists_and_with_leaks(tmp_path):
  fx.write_acdc_npz(tmp_path, {'train': (1,), 'validation': (2,), 'test': (3,)},
                    with_lists=False)
  assert len(collect(acdc.generate_examples(tmp_path, 'train',
                                            val_cases=['patient002']))) == 2
  leaky = tmp_path / 'leaky'
  fx.write_acdc_npz(leaky, {'train': (1, 2), 'test': (2,)}, with_lists=False)
  message = raised(ValueError, acdc.generate_examples, leaky, 'train')
  assert 'patient002' in message and 'case_002' in message
  (tmp_path / 'valid' / 'patient7.npz').write_bytes(b'')
  message = raised(ValueError, acdc.generate_examples, tmp_path, 'validation')
  assert 'patient7.npz' in message and 'unexpected file name' in message


def test_acdc_npz_copy_holds_validation_out_of_train_and_valid(tmp_path):
  fx.write_acdc_npz(tmp_path, {'train': (1, 3), 'validation': (4,),
                               'test': (2,)})

  def patients(split, **options):
    return {e['case_id'].split('_')[0]
            for _, e in acdc.generate_examples(tmp_path, split, **options)}

  assert patients('train', val_cases=0) == {
      'patient001', 'patient003', 'patient004'}
  assert not patients('validation', val_cases=0)
  assert patients('validation', val_cases=['patient001']) == {'patient001'}
  assert patients('train', val_cases=['patient001']) == {
      'patient003', 'patient004'}
  drawn = patients('validation', val_cases=2, seed=5)
  assert len(drawn) == 2 and drawn <= {'patient001', 'patient003',
                                       'patient004'}
  assert patients('test', val_cases=0) == {'patient002'}
  # The default validation patients are the reference ones, absent here.
  message = raised(ValueError, acdc.generate_examples, tmp_path, 'train')
  assert message.startswith("ACDC validation patients: ['patient019', ")


def test_acdc_npz_list_names_missing_file(tmp_path):
  fx.write_acdc_npz(tmp_path, {'train': (1,), 'test': (3,)})
  missing = tmp_path / 'train' / 'case_001_sliceED_0.npz'
  missing.unlink()
  assert str(missing) in raised(
      FileNotFoundError, acdc.generate_examples, tmp_path, 'train')


# ----------------------------------------------------------------------------
# GlaS.

GLAS_COUNTS = {'train': 5, 'testA': 2, 'testB': 1}
GLAS_VAL = 1


def test_glas_official_release(tmp_path):
  written = fx.write_glas_release(tmp_path, GLAS_COUNTS)
  pairs = {split: collect(glas.generate_examples(tmp_path, split,
                                                 val_cases=GLAS_VAL))
           for split in glas.SPLITS}
  stems = {split: {k for k, _ in p} for split, p in pairs.items()}
  train_stems = {f'train_{n}' for n in range(1, GLAS_COUNTS['train'] + 1)}
  assert len(stems['validation']) == GLAS_VAL
  assert stems['train'] | stems['validation'] == train_stems
  assert not stems['train'] & stems['validation']
  assert stems['test'] == {f'{part}_{n}' for part in ('testA', 'testB')
                           for n in range(1, GLAS_COUNTS[part] + 1)}
  for split_pairs in pairs.values():
    for key, example in split_pairs:
      check_contract(glas, example)
      image, instances = written[key]
      assert example['case_id'] == key and example['slice_index'] == 0
      np.testing.assert_array_equal(example['image'], image)
      np.testing.assert_array_equal(example['label'], instances > 0)
  sizes = {e['image'].shape[:2] for p in pairs.values() for _, e in p}
  assert len(sizes) > 1  # Native sizes are kept.
  only_b = collect(glas.generate_examples(tmp_path, 'test',
                                          test_parts=['testB']))
  assert {k for k, _ in only_b} == {
      f'testB_{n}' for n in range(1, GLAS_COUNTS['testB'] + 1)}
  redrawn = {k for k, _ in glas.generate_examples(
      tmp_path, 'validation', val_cases=2, seed=3)}
  assert len(redrawn) == 2 and redrawn <= train_stems


def test_glas_split_folders_with_anno_masks(tmp_path):
  written = fx.write_split_folders(
      tmp_path, {'train': 2, 'validation': 1, 'test': 1},
      image_suffix='.bmp', mask_suffix='_anno.bmp')
  for split in glas.SPLITS:
    for key, example in collect(glas.generate_examples(tmp_path, split)):
      check_contract(glas, example)
      assert key.startswith(f'{split}_image_')
      np.testing.assert_array_equal(example['image'], written[key][0])
      np.testing.assert_array_equal(example['label'], written[key][1])


def test_glas_train_test_folders_hold_validation_out_of_train(tmp_path):
  written = fx.write_split_folders(tmp_path, {'train': 5, 'test': 2},
                                   instance_ids=True)
  train_stems = {f'train_image_{n}' for n in range(5)}

  def stems(split, **options):
    pairs = collect(glas.generate_examples(tmp_path, split, **options))
    for key, example in pairs:
      check_contract(glas, example)
      np.testing.assert_array_equal(example['image'], written[key][0])
      np.testing.assert_array_equal(example['label'], written[key][1])
    return {key for key, _ in pairs}

  drawn = stems('validation', val_cases=2, seed=1)
  assert len(drawn) == 2 and drawn <= train_stems
  assert stems('train', val_cases=2, seed=1) == train_stems - drawn
  assert stems('validation', val_cases=2, seed=1) == drawn
  assert stems('validation', val_cases=['train_image_3']) == {'train_image_3'}
  assert stems('train', val_cases=0) == train_stems
  assert not stems('validation', val_cases=0)
  assert stems('test', val_cases=0) == {'test_image_0', 'test_image_1'}
  assert raised(ValueError, glas.generate_examples, tmp_path, 'train',
                val_cases=5) == ('GlaS validation images: cannot hold out 5 '
                                 'of 5 candidates.')


def write_patient_folders(root: pathlib.Path) -> None:
  """training/patient001..100, empty: a plan looks at folder names only."""
  for patient in ACDC_PATIENTS:
    (root / 'training' / patient).mkdir(parents=True)


@pytest.fixture
def layout_folders(tmp_path):
  """A function writing a tiny copy of a layout (by name below) and
  returning its folder."""
  def write(name):
    src = tmp_path / name.replace('/', '_').replace(' ', '_')
    writers = {
        'synapse copy': lambda: fx.write_transunet_copy(
            src, synapse.TRAIN_CASES[:2], synapse.TEST_CASES[:1]),
        'acdc raw': lambda: write_patient_folders(src),
        'acdc copy': lambda: fx.write_acdc_npz(src, {'train': (1,),
                                                     'test': (2,)}),
        'split folders': lambda: fx.write_split_folders(
            src, {'train': 2, 'validation': 1, 'test': 1}),
        'train/test folders': lambda: fx.write_split_folders(
            src, {'train': 2, 'test': 1}),
        'glas release': lambda: fx.write_glas_release(src, GLAS_COUNTS),
        'monuseg release': lambda: fx.write_monuseg_release(
            src, MONUSEG_TRAIN, MONUSEG_TEST),
    }
    writers[name]()
    return src
  return write


ALL_SPLITS = ('train', 'validation', 'test')
NO_VALIDATION = ('train', 'test')
# (source, layout written, options given) -> (layout found, splits written,
# options recorded): every option the layout applies, none that it does not.
PLANS = [
    (synapse, 'synapse copy', {}, (synapse.TRANSUNET, ALL_SPLITS,
                                   {'val_cases': 2, 'seed': 0})),
    (synapse, 'synapse copy', {'val_cases': 0},
     (synapse.TRANSUNET, NO_VALIDATION, {'val_cases': 0})),
    (synapse, 'synapse copy', {'val_cases': ['case0005']},
     (synapse.TRANSUNET, ALL_SPLITS, {'val_cases': ['case0005']})),
    (acdc, 'acdc raw', {}, (acdc.RAW, ALL_SPLITS, {
        'val_cases': list(acdc.REFERENCE_PATIENTS['validation']),
        'patient_split': 'reference'})),
    (acdc, 'acdc raw', {'val_cases': 3, 'seed': 2}, (acdc.RAW, ALL_SPLITS, {
        'val_cases': 3, 'seed': 2, 'patient_split': 'reference'})),
    (acdc, 'acdc raw', {'patient_split': 'seeded'}, (acdc.RAW, ALL_SPLITS, {
        'seed': 0, 'patient_split': 'seeded',
        'split_fractions': [0.7, 0.1, 0.2], 'include_testing': False})),
    (acdc, 'acdc raw', {'patient_split': 'seeded',
                        'split_fractions': [0.5, 0.0, 0.5]},
     (acdc.RAW, NO_VALIDATION, {
         'seed': 0, 'patient_split': 'seeded',
         'split_fractions': [0.5, 0.0, 0.5], 'include_testing': False})),
    (acdc, 'acdc copy', {'val_cases': 0}, (acdc.NPZ, NO_VALIDATION,
                                           {'val_cases': 0})),
    (glas, 'glas release', {}, (glas.RELEASE, ALL_SPLITS, {
        'val_cases': 17, 'seed': 0, 'test_parts': ['testA', 'testB']})),
    (glas, 'glas release', {'val_cases': 0}, (glas.RELEASE, NO_VALIDATION, {
        'val_cases': 0, 'test_parts': ['testA', 'testB']})),
    (glas, 'split folders', {}, ('split folders', ALL_SPLITS, {})),
    (glas, 'train/test folders', {}, ('train/test folders', ALL_SPLITS,
                                      {'val_cases': 17, 'seed': 0})),
    (glas, 'train/test folders', {'val_cases': 0},
     ('train/test folders', NO_VALIDATION, {'val_cases': 0})),
    (monuseg, 'monuseg release', {}, (monuseg.RELEASE, ALL_SPLITS, {
        'val_cases': list(monuseg.UCTRANSNET_VAL_IMAGES)})),
    (monuseg, 'monuseg release', {'val_cases': 2, 'seed': 1},
     (monuseg.RELEASE, ALL_SPLITS, {'val_cases': 2, 'seed': 1})),
    (monuseg, 'split folders', {}, ('split folders', ALL_SPLITS, {})),
    (monuseg, 'train/test folders', {'val_cases': 0},
     ('train/test folders', NO_VALIDATION, {'val_cases': 0})),
]


@pytest.mark.parametrize('module, layout, given, expected', PLANS,
                         ids=lambda x: x.NAME if hasattr(x, 'NAME') else None)
def test_plans_record_only_the_options_applied(module, layout, given,
                                               expected, layout_folders):
  plan, recorded = sources.plan_build(module, layout_folders(layout), given)
  assert (plan.layout, plan.splits, recorded) == expected


# (source, layout written, options given) -> the option refused and why.
REFUSALS = [
    (synapse, 'synapse copy', {'val_cases': 0, 'seed': 1},
     "'seed' does not apply to this synapse build (layout: TransUNet copy): "
     'it seeds a draw of a count of training cases, and val_cases is 0'),
    (acdc, 'acdc raw', {'include_testing': True},
     "'include_testing' does not apply to this acdc build (layout: raw "
     'release): only patient_split=seeded (raw release) uses it'),
    (acdc, 'acdc raw', {'patient_split': 'seeded', 'val_cases': 0},
     "'val_cases' does not apply to this acdc build (layout: raw release): "
     'patient_split=seeded takes the validation share from split_fractions'),
    (acdc, 'acdc copy', {'patient_split': 'seeded', 'seed': 3},
     "'patient_split', 'seed' do not apply to this acdc build (layout: npz "
     "copy): patient_split: the npz copy's test patients are those of its "
     'test/ folder; seed: it seeds a draw of a count of patients, and '
     'val_cases names them'),
    (glas, 'split folders', {'val_cases': 0},
     "'val_cases' does not apply to this glas build (layout: split folders): "
     'the validation images are those of Val_Folder/ (without that folder '
     'they are held out of Train_Folder/)'),
    (glas, 'train/test folders', {'test_parts': ['testA']},
     "'test_parts' does not apply to this glas build (layout: train/test "
     'folders): only the official release uses it'),
    (monuseg, 'split folders', {'seed': 1},
     "'seed' does not apply to this monuseg build (layout: split folders): "
     'the validation images are those of Val_Folder/ (without that folder '
     'they are held out of Train_Folder/)'),
    (monuseg, 'monuseg release', {'seed': 1},
     "'seed' does not apply to this monuseg build (layout: official "
     'release): it seeds a draw of a count of training images, and val_cases '
     'names them'),
]


@pytest.mark.parametrize('module, layout, given, refusal', REFUSALS,
                         ids=lambda x: x.NAME if hasattr(x, 'NAME') else None)
def test_plans_refuse_given_options_they_do_not_apply(module, layout, given,
                                                      refusal, layout_folders):
  src = layout_folders(layout)
  with pytest.raises(ValueError) as info:
    sources.plan_build(module, src, given)
  assert str(info.value) == f'{src}: build option {refusal}.'


def test_histology_bad_inputs_name_the_file(tmp_path):
  fx.write_split_folders(tmp_path, {'train': 2})
  image_folder = tmp_path / 'Train_Folder' / 'img'
  mask_folder = tmp_path / 'Train_Folder' / 'labelcol'
  image = image_folder / 'train_image_0.png'
  mask = mask_folder / 'train_image_0.png'
  hw = fx.picture_hw(0)
  rgba = np.concatenate([fx.random_rgb(np.random.default_rng(1), hw),
                         np.full((*hw, 1), 255, np.uint8)], axis=-1)
  fx.write_rgb(image, rgba)
  (_, example), _ = collect(glas.generate_examples(tmp_path, 'train',
                                                   val_cases=0))
  np.testing.assert_array_equal(example['image'], rgba[..., :3])

  def message(kind):
    return raised(kind, glas.generate_examples, tmp_path, 'train', val_cases=0)

  fx.write_gray(image, np.zeros(hw, np.uint8))
  assert str(image) in message(ValueError)
  assert 'grayscale' in message(ValueError)
  taller = (hw[0] + 1, hw[1])
  fx.write_rgb(image, fx.random_rgb(np.random.default_rng(2), taller))
  assert str(mask) in message(ValueError) and str(image) in message(ValueError)
  assert 'does not match' in message(ValueError)
  corrupt(image)
  assert str(image) in message(ValueError)
  assert 'unreadable' in message(ValueError)
  image.unlink()
  assert str(mask) in message(FileNotFoundError)
  assert 'no image' in message(FileNotFoundError)
  mask.unlink()
  (mask_folder / 'train_image_1.png').unlink()
  assert str(image_folder / 'train_image_1.png') in message(FileNotFoundError)
  assert 'no mask' in message(FileNotFoundError)


def test_glas_release_missing_annotation(tmp_path):
  fx.write_glas_release(tmp_path, GLAS_COUNTS)
  (tmp_path / 'testB_1_anno.bmp').unlink()
  message = raised(FileNotFoundError, glas.generate_examples, tmp_path,
                   'train', val_cases=GLAS_VAL)
  assert str(tmp_path / 'testB_1.bmp') in message and 'no mask' in message


# ----------------------------------------------------------------------------
# MoNuSeg.

MONUSEG_TRAIN = tuple(f'TCGA-TRAIN-{n}' for n in range(4))
MONUSEG_TEST = ('TCGA-TEST-0', 'TCGA-TEST-1')


def boxes_mask(boxes, hw):
  """Inclusive (top, left, bottom, right) rectangles filled with 1."""
  mask = np.zeros(hw, np.uint8)
  for top, left, bottom, right in boxes:
    mask[top:bottom + 1, left:right + 1] = 1
  return mask


def test_monuseg_official_release(tmp_path):
  written = fx.write_monuseg_release(tmp_path, MONUSEG_TRAIN, MONUSEG_TEST)
  held = [MONUSEG_TRAIN[2]]
  pairs = {split: collect(monuseg.generate_examples(tmp_path, split,
                                                    val_cases=held))
           for split in monuseg.SPLITS}
  assert {k for k, _ in pairs['validation']} == set(held)
  assert {k for k, _ in pairs['train']} == set(MONUSEG_TRAIN) - set(held)
  assert {k for k, _ in pairs['test']} == set(MONUSEG_TEST)
  for split_pairs in pairs.values():
    for key, example in split_pairs:
      check_contract(monuseg, example)
      image, boxes = written[key]
      np.testing.assert_array_equal(example['image'], image)
      np.testing.assert_array_equal(example['label'],
                                    boxes_mask(boxes, fx.MONUSEG_HW))
  counted = collect(monuseg.generate_examples(tmp_path, 'validation',
                                              val_cases=2))
  assert len(counted) == 2
  # The default validation images are the UCTransNet ones, absent here.
  assert monuseg.UCTRANSNET_VAL_IMAGES[0] in raised(
      ValueError, monuseg.generate_examples, tmp_path, 'validation')


def test_monuseg_polygon_fill_orientation():
  # A right triangle with its right angle at the top left; X is the column.
  triangle = [np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 3.0]])]
  mask = monuseg.polygon_mask(triangle, (5, 8))
  assert mask[0, :7].all() and not mask[0, 7]
  assert mask[:4, 0].all() and not mask[4].any()
  assert mask[3, 0] and not mask[3, 2]


def test_monuseg_bad_annotations_name_the_file(tmp_path):
  fx.write_monuseg_release(tmp_path, MONUSEG_TRAIN[:2], ())
  training = tmp_path / 'MoNuSeg 2018 Training Data'
  xml = training / 'Annotations' / f'{MONUSEG_TRAIN[0]}.xml'
  tif = training / 'Tissue Images' / f'{MONUSEG_TRAIN[0]}.tif'

  def message(kind):
    return raised(kind, monuseg.generate_examples, tmp_path, 'train',
                  val_cases=0)

  xml.write_text(fx.aperio_xml(['<Vertex X="1.0" Z="0"/>' * 3]))
  assert str(xml) in message(ValueError)
  assert 'numeric X/Y' in message(ValueError)
  xml.write_text(fx.aperio_xml([]))
  assert str(xml) in message(ValueError)
  assert 'no polygon' in message(ValueError)
  xml.write_text('<Annotations><Annotation>')
  assert str(xml) in message(ValueError)
  assert 'unreadable' in message(ValueError)
  xml.unlink()
  assert str(tif) in message(FileNotFoundError)
  assert 'no mask' in message(FileNotFoundError)
  assert 'testing part' in raised(
      FileNotFoundError, monuseg.generate_examples, tmp_path, 'test')


def test_monuseg_polygon_outside_its_image_is_refused(tmp_path):
  fx.write_monuseg_release(tmp_path, MONUSEG_TRAIN[:2], ())
  xml = (tmp_path / 'MoNuSeg 2018 Training Data' / 'Annotations' /
         f'{MONUSEG_TRAIN[0]}.xml')
  height, width = fx.MONUSEG_HW
  inside = fx.rectangle_polygon(2, 3, 6, 9)
  # (top, left, bottom, right) of polygons with no vertex in the image: one
  # beside it (filled to nothing) and one around it (filled to all of it).
  for box in ((5, width + 2, 9, width + 12), (-4, -3, height + 4, width + 5)):
    xml.write_text(fx.aperio_xml([inside, fx.rectangle_polygon(*box)]))
    top, left, bottom, right = box
    message = raised(ValueError, monuseg.generate_examples, tmp_path, 'train',
                     val_cases=0)
    assert message == (
        f'{xml}: polygon 1 (0-based, of 2) lies entirely outside the '
        f'{width}x{height} image: its vertices span x {left}..{right}, '
        f'y {top}..{bottom} px.')


def test_monuseg_polygon_across_the_border_is_clipped(tmp_path):
  fx.write_monuseg_release(tmp_path, MONUSEG_TRAIN[:1], ())
  xml = (tmp_path / 'MoNuSeg 2018 Training Data' / 'Annotations' /
         f'{MONUSEG_TRAIN[0]}.xml')
  height, width = fx.MONUSEG_HW
  xml.write_text(fx.aperio_xml([fx.rectangle_polygon(-3, width - 4,
                                                     5, width + 6)]))
  (_, example), = collect(monuseg.generate_examples(tmp_path, 'train',
                                                    val_cases=0))
  expected = np.zeros(fx.MONUSEG_HW, np.uint8)
  expected[:6, width - 4:] = 1
  np.testing.assert_array_equal(example['label'], expected)


def test_split_folder_without_pictures_is_refused(tmp_path):
  fx.write_split_folders(tmp_path, {'train': 2})
  for folder in ('img', 'labelcol'):
    (tmp_path / 'Val_Folder' / folder).mkdir(parents=True)
  for module in (glas, monuseg):
    message = raised(FileNotFoundError, module.generate_examples, tmp_path,
                     'validation')
    assert message == (f"{tmp_path / 'Val_Folder'}: the 'validation' split is "
                       'empty (no pictures in img/ nor masks in labelcol/).')


def test_monuseg_split_folders_with_tiff_images(tmp_path):
  written = fx.write_split_folders(tmp_path, {'test': 2}, image_suffix='.tif',
                                   hw=fx.MONUSEG_HW)
  pairs = collect(monuseg.generate_examples(tmp_path, 'test'))
  assert len(pairs) == 2
  for key, example in pairs:
    check_contract(monuseg, example)
    np.testing.assert_array_equal(example['image'], written[key][0])
    np.testing.assert_array_equal(example['label'], written[key][1])
  assert 'Train_Folder' in raised(
      FileNotFoundError, monuseg.generate_examples, tmp_path, 'train')


REAL_COUNTS = {'train': 24, 'validation': 6, 'test': 14}
REAL_HW = (1000, 1000)
REAL_IMAGES_READ_PER_SPLIT = 2


def test_monuseg_real_data():
  if not REAL_MONUSEG.is_dir():
    pytest.skip(f'{REAL_MONUSEG} is absent')
  stems = {}
  for split, count in REAL_COUNTS.items():
    pairs = common.split_folder_pairs(REAL_MONUSEG, split)
    assert len(pairs) == count
    stems[split] = {image.stem for image, _ in pairs}
    examples = itertools.islice(monuseg.generate_examples(REAL_MONUSEG, split),
                                REAL_IMAGES_READ_PER_SPLIT)
    for key, example in examples:
      check_contract(monuseg, example)
      assert key in stems[split]
      assert example['image'].shape == (*REAL_HW, 3)
      assert set(np.unique(example['label'])) == {0, 1}
      assert 0.05 < example['label'].mean() < 0.6  # Nuclei cover a fraction.
      assert example['image'].std() > 10  # A stained slide, not a blank.
  assert stems['validation'] == set(monuseg.UCTRANSNET_VAL_IMAGES)
  assert not stems['test'] & (stems['train'] | stems['validation'])
  assert not stems['train'] & stems['validation']
