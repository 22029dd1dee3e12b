"""Synapse multi-organ CT (BTCV abdomen, 30 labelled cases) as 2D axial slices.

Two layouts are read:

* raw BTCV release: `img/imgXXXX.nii.gz` and `label/labelXXXX.nii.gz` (also
  under `Training/` or `RawData/Training/`). HU are clipped to [-125, 275] and
  scaled to [0, 1]; raw organ ids are remapped to the 9 Synapse classes.
  Orientation: NIfTI voxels are (x, y, z); volumes are transposed to (z, y, x)
  without flips, so slice k is the k-th axial slice, indexed [y, x] as in the
  file's voxel grid (the TransUNet (D, 512, 512) convention). The TransUNet copy
  may differ from this by an in-plane flip; train and evaluate on one layout.
  Spacing is the header's voxel size, reordered to (z, y, x) mm.
* TransUNet copy: `train_npz/caseXXXX_sliceNNN.npz` (keys image, label; the 18
  training cases) and `test_vol_h5/caseXXXX.npy.h5` (datasets image, label of
  shape (D, 512, 512); the 12 test cases), already clipped, scaled and
  remapped. It records no spacing, so spacing is (1, 1, 1).

Cases are named 'caseXXXX' in both layouts and every slice is kept.
"""

import pathlib
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from data_prep import sources
from data_prep.sources import common

NAME = 'synapse'
NUM_CLASSES = 9
IN_CHANNELS = 1
IMAGE_DTYPE = np.float32
IS_VOLUMETRIC = True
SPLITS = ('train', 'validation', 'test')

CLASS_NAMES = ('background', 'aorta', 'gallbladder', 'left kidney',
               'right kidney', 'liver', 'pancreas', 'spleen', 'stomach')
# Raw BTCV organ id of classes 1..8; every other raw id (0..13) -> background.
BTCV_IDS = (8, 4, 3, 2, 6, 11, 1, 7)
BTCV_NUM_IDS = 14
HU_WINDOW = (-125.0, 275.0)
TRAIN_CASES = tuple(f'case{n:04d}' for n in (
    5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40))
TEST_CASES = tuple(f'case{n:04d}' for n in (
    1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38))

_SPEC = common.ExampleSpec(NUM_CLASSES, IN_CHANNELS, IMAGE_DTYPE)
_RAW_ROOTS = ('.', 'Training', 'RawData/Training')
_SLICE_FILE = re.compile(r'(case\d{4})_slice(\d+)\.npz')
_VOLUME_FILE = re.compile(r'(case\d{4})\.npy\.h5')
RAW = 'raw BTCV release'
TRANSUNET = 'TransUNet copy'
LAYOUTS = {
    RAW: 'img/imgXXXX.nii.gz + label/labelXXXX.nii.gz (optionally under '
         'Training/ or RawData/Training/)',
    TRANSUNET: 'train_npz/caseXXXX_sliceNNN.npz (keys image, label) and/or '
               'test_vol_h5/caseXXXX.npy.h5 (datasets image, label)',
}
MANUAL_DOWNLOAD_INSTRUCTIONS = common.instructions(
    NAME, 'Synapse',
    'raw BTCV: https://www.synapse.org/#!Synapse:syn3193805/wiki/217789 '
    '(RawData.zip, needs a free Synapse account); preprocessed copy: the '
    'TransUNet authors\' "Synapse" data (project_TransUNet/data/Synapse).',
    LAYOUTS,
    notes='Split: 18 training / 12 test cases (TransUNet); validation cases '
          'are held out of the 18 training cases.\n')


def case_splits(val_cases: int | Sequence[str] = 2,
                seed: int = 0) -> Mapping[str, tuple[str, ...]]:
  """Case ids of each split: validation is held out of the training cases.

  Raises:
    ValueError: a requested validation case is not a training case.
    AssertionError: a test case ended up in train or validation.
  """
  train, validation = common.hold_out(
      TRAIN_CASES, val_cases, seed, 'Synapse validation cases')
  leaked = set(TEST_CASES) & (set(train) | set(validation))
  if leaked:
    raise AssertionError(f'Test cases {sorted(leaked)} leaked into training.')
  return {'train': train, 'validation': validation, 'test': TEST_CASES}


def _raw_root(src: pathlib.Path) -> pathlib.Path | None:
  for relative in _RAW_ROOTS:
    root = src / relative
    if (root / 'img').is_dir() and (root / 'label').is_dir():
      return root
  return None


def _remap_btcv(raw: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Raw BTCV ids (0..13) -> Synapse classes 0..8."""
  lookup = np.zeros(BTCV_NUM_IDS, np.uint8)
  lookup[list(BTCV_IDS)] = np.arange(1, NUM_CLASSES, dtype=np.uint8)
  return lookup[common.integer_labels(raw, BTCV_NUM_IDS, path)]


def scale_hu(hu: np.ndarray) -> np.ndarray:
  """Clips Hounsfield units to HU_WINDOW and scales them to [0, 1] float32."""
  low, high = HU_WINDOW
  return ((np.clip(hu.astype(np.float32), low, high) - low) / (high - low)
          ).astype(np.float32)


def _raw_case_numbers(root: pathlib.Path) -> list[str]:
  """Case numbers 'XXXX' in img/ and label/, each with both files."""
  def numbers(folder, prefix):
    pattern = re.compile(rf'{prefix}(\d{{4}})')
    found = {}
    for path in folder.iterdir():
      match = pattern.fullmatch(common.nifti_stem(path))
      if match and path.name.endswith(common.NIFTI_SUFFIXES):
        found[match.group(1)] = path
    return found

  images = numbers(root / 'img', 'img')
  labels = numbers(root / 'label', 'label')
  for number, path in images.items():
    if number not in labels:
      raise FileNotFoundError(f'{path}: CT volume has no label (expected '
                              f'label/label{number}.nii.gz).')
  for number, path in labels.items():
    if number not in images:
      raise FileNotFoundError(
          f'{path}: label has no CT volume (expected img/img{number}.nii.gz).')
  return sorted(images)


def _raw_examples(root: pathlib.Path,
                  cases: Sequence[str]) -> Iterator[common.KeyedExample]:
  present = _raw_case_numbers(root)
  for case_id in cases:
    number = case_id.removeprefix('case')
    image_path = common.find_nifti(root / 'img', f'img{number}')
    label_path = common.find_nifti(root / 'label', f'label{number}')
    if number not in present:
      raise FileNotFoundError(
          f'{image_path}: CT volume of {case_id} not found.')
    hu, spacing = common.read_nifti(image_path, 'CT volume')
    raw_label, _ = common.read_nifti(label_path, 'label volume')
    yield from common.volume_examples(
        _SPEC, case_id=case_id, image=scale_hu(hu),
        label=_remap_btcv(raw_label, label_path), spacing=spacing,
        image_path=image_path, label_path=label_path)


def _files_by_case(folder: pathlib.Path, pattern: re.Pattern[str],
                   allowed: Sequence[str],
                   ) -> dict[str, list[tuple[int, pathlib.Path]]]:
  """Files of `folder` named by `pattern` grouped by case (`allowed` only)."""
  by_case = {}
  for path in sorted(folder.iterdir()):
    match = pattern.fullmatch(path.name)
    if not match:
      continue
    case_id = match.group(1)
    if case_id not in allowed:
      kind = 'a test case' if case_id in TEST_CASES else (
          'a training case' if case_id in TRAIN_CASES else
          'not one of the 30 labelled BTCV cases')
      raise ValueError(
          f'{path}: {case_id} is {kind}; {folder.name} may only hold the '
          f'{len(allowed)} cases {allowed[0]}..{allowed[-1]}.')
    index = int(match.group(2)) if pattern.groups > 1 else 0
    by_case.setdefault(case_id, []).append((index, path))
  return by_case


def _transunet_examples(src: pathlib.Path, split: str,
                        cases: Sequence[str]) -> Iterator[common.KeyedExample]:
  if split == 'test':
    folder, pattern, allowed = src / 'test_vol_h5', _VOLUME_FILE, TEST_CASES
  else:
    folder, pattern, allowed = src / 'train_npz', _SLICE_FILE, TRAIN_CASES
  if not folder.is_dir():
    raise FileNotFoundError(f'{folder}: missing; the TransUNet copy keeps the '
                            f'{split!r} cases there.')
  by_case = _files_by_case(folder, pattern, allowed)
  for case_id in cases:
    if case_id not in by_case:
      raise FileNotFoundError(f'{folder}: holds no files of {case_id}.')
    for index, path in sorted(by_case[case_id]):
      arrays = common.read_arrays(path, ('image', 'label'))
      image = np.asarray(arrays['image'], np.float32)
      if split == 'test':
        yield from common.volume_examples(
            _SPEC, case_id=case_id, image=image, label=arrays['label'],
            spacing=common.UNIT_SPACING, image_path=path, label_path=path)
      else:
        if image.ndim != 2:
          raise ValueError(
              f'{path}: image of shape {image.shape}; expected a 2D slice.')
        yield common.slice_key(case_id, index), common.make_example(
            _SPEC, image=image[..., None], label=arrays['label'],
            case_id=case_id, slice_index=index, spacing=common.UNIT_SPACING,
            image_path=path, label_path=path)


def _layout(src: pathlib.Path) -> str:
  """The layout (a key of LAYOUTS) that `src` holds."""
  if _raw_root(src) is not None:
    return RAW
  if (src / 'train_npz').is_dir() or (src / 'test_vol_h5').is_dir():
    return TRANSUNET
  raise common.layout_error(src, 'Synapse', LAYOUTS)


def plan_build(src: pathlib.Path, options: Mapping[str, Any]
               ) -> sources.BuildPlan:
  """The layout in `src`, the splits written and the options left unused."""
  validation = case_splits(options['val_cases'], options['seed'])['validation']
  return sources.BuildPlan(
      _layout(src), sources.splits_with(validation=bool(validation)),
      common.unused_seed(options['val_cases'], 'training cases'))


def generate_examples(src: pathlib.Path | str | None, split: str, *,
                      val_cases: int | Sequence[str] = 2,
                      seed: int = 0) -> Iterator[common.KeyedExample]:
  """Yields ('caseXXXX_sliceNNN', example) for every slice of the split's cases.

  Examples hold 'image' (H, W, 1) float32 in [0, 1], 'label' (H, W) uint8 in
  [0, 9), 'case_id' 'caseXXXX', 'slice_index' and 'spacing' (z, y, x) mm.

  Args:
    src: folder holding the raw BTCV release or the TransUNet copy.
    split: 'train', 'validation' or 'test' (the 12 TransUNet test cases).
    val_cases: the training cases held out for validation, as a count drawn
      by a seeded shuffle or as ids ('caseXXXX'); never a test case; 0 builds
      no validation split (all 18 cases train).
    seed: seed of a counted validation draw.
  """
  common.check_split(split, SPLITS)
  src = common.require_folder(src, MANUAL_DOWNLOAD_INSTRUCTIONS)
  cases = case_splits(val_cases, seed)[split]
  if _layout(src) == RAW:
    return _raw_examples(_raw_root(src), cases)
  return _transunet_examples(src, split, cases)
