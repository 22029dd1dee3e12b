"""ACDC cardiac cine MRI (ED and ES frames with masks) as 2D short-axis slices.

Classes: 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle (the
release's own ids). Two layouts are read:

* raw release: `patientXXX/patientXXX_frameYY.nii.gz` + `..._frameYY_gt.nii.gz`
  per patient folder, inside `training/` (patients 001-100) and optionally
  `testing/` (101-150, when its masks are present), or directly in the source
  folder. The ED and ES frames come from `Info.cfg` (`ED:` / `ES:` lines) or,
  without it, from the `_gt` files present. A case is patient + frame, e.g.
  'patient001_frame01'. Each frame volume is min-max normalised on its own to
  [0, 1] (the range the npz copy's float images use; its exact recipe is not
  published, so this is our documented choice). Volumes are transposed from
  NIfTI (x, y, z) to (z, y, x) without flips (slice k is the k-th short-axis
  slice, indexed [y, x]); spacing is the header's voxel size as (z, y, x) mm.
  Patients are split 70/10/20 (train/validation/test) by a seeded shuffle of
  the patient ids, so both frames of a patient stay in one split.
* npz copy (MT-UNet / Swin-UNet ACDC data): `train/case_XXX_sliceED_N.npz` and
  `valid/...` 2D slices, `test/case_XXX_volume_ED.npz` (D, H, W) volumes, keys
  img and label, optionally listed by `lists_ACDC/{train,valid,test}.txt`.
  The split is the copy's own; images are taken as stored. The files name the
  phase, not the frame, so a case is e.g. 'patient001_ED'. Spacing is not
  recorded, so it is (1, 1, 1).
"""

import pathlib
import re
from typing import Iterator, Sequence

import numpy as np

from data_prep.sources import common

NAME = 'acdc'
NUM_CLASSES = 4
IN_CHANNELS = 1
IMAGE_DTYPE = np.float32
IS_VOLUMETRIC = True
SPLITS = ('train', 'validation', 'test')

CLASS_NAMES = ('background', 'right ventricle', 'myocardium', 'left ventricle')
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)

_SPEC = common.ExampleSpec(NUM_CLASSES, IN_CHANNELS, IMAGE_DTYPE)
_PATIENT_FOLDER = re.compile(r'patient(\d{3})')
_NPZ_FOLDERS = {'train': 'train', 'validation': 'valid', 'test': 'test'}
_NPZ_SLICE_FILE = re.compile(r'case_(\d{3})_slice(ED|ES)_(\d+)\.npz')
_NPZ_VOLUME_FILE = re.compile(r'case_(\d{3})_volume_(ED|ES)\.npz')
LAYOUTS = {
    'raw release': 'training/patientXXX/patientXXX_frameYY.nii.gz + '
                   'patientXXX_frameYY_gt.nii.gz (+ Info.cfg); testing/ '
                   'optional; the patient folders may also sit directly in the '
                   'folder',
    'npz copy': 'train/case_XXX_sliceED_N.npz, valid/..., '
                'test/case_XXX_volume_ED.npz (keys img, label), optional '
                'lists_ACDC/{train,valid,test}.txt',
}
MANUAL_DOWNLOAD_INSTRUCTIONS = common.instructions(
    NAME, 'ACDC',
    'raw release: https://humanheart-project.creatis.insa-lyon.fr/database/ '
    '(ACDC collection, free registration; formerly '
    'https://www.creatis.insa-lyon.fr/Challenge/acdc/); npz copy: the '
    'MT-UNet / Swin-UNet "ACDC" data.',
    LAYOUTS,
    notes='Raw release split: 70/10/20 patients (seeded); the npz copy keeps '
          'its own split.\n')


# ----------------------------------------------------------------------------
# Raw release.


def _patient_folders(src: pathlib.Path,
                     include_testing: bool) -> list[pathlib.Path] | None:
  """Patient folders of the raw release, or None when `src` is not one."""
  parents = [src / 'training'] + ([src / 'testing'] if include_testing else [])
  if not parents[0].is_dir():
    parents = [src]
  folders = [p for parent in parents if parent.is_dir()
             for p in sorted(parent.iterdir())
             if p.is_dir() and _PATIENT_FOLDER.fullmatch(p.name)]
  return folders or None


def _info_frames(info_path: pathlib.Path) -> tuple[int, ...]:
  """ED and ES frame numbers from an `Info.cfg`."""
  def parse(path):
    entries = {}
    for line in path.read_text().splitlines():
      key, sep, value = line.partition(':')
      if sep:
        entries[key.strip()] = value.strip()
    return entries

  entries = common.read_with(info_path, 'patient info', parse)
  frames = []
  for phase in ('ED', 'ES'):
    if not entries.get(phase, '').isdigit():
      raise ValueError(
          f'{info_path}: no usable "{phase}: <frame>" line; found {entries}.')
    frames.append(int(entries[phase]))
  return tuple(sorted(set(frames)))


def _frame_files(
    folder: pathlib.Path) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
  """(case id, image path, mask path) of a patient's annotated frames."""
  patient = folder.name
  info = folder / 'Info.cfg'
  if info.is_file():
    stems = [f'{patient}_frame{frame:02d}' for frame in _info_frames(info)]
  else:
    found = {common.nifti_stem(p).removesuffix('_gt') for p in folder.iterdir()
             if p.name.endswith(common.NIFTI_SUFFIXES)}
    frame_stem = re.compile(rf'{patient}_frame\d+')
    stems = sorted(s for s in found if frame_stem.fullmatch(s))
  if not stems:
    raise FileNotFoundError(
        f'{folder}: no Info.cfg and no {patient}_frameYY(_gt).nii.gz files.')
  files = []
  for stem in stems:
    image = common.find_nifti(folder, stem)
    mask = common.find_nifti(folder, f'{stem}_gt')
    if not image.is_file():
      raise FileNotFoundError(f'{image}: frame image not found (mask {mask}).')
    if not mask.is_file():
      raise FileNotFoundError(
          f'{mask}: ground truth of frame {image} not found.')
    files.append((stem, image, mask))
  return files


def normalise_volume(volume: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """Min-max normalises one MRI volume to [0, 1] float32."""
  volume = volume.astype(np.float32)
  low, high = float(volume.min()), float(volume.max())
  if not np.isfinite(low + high) or high <= low:
    raise ValueError(
        f'{path}: MRI volume has no usable intensity range [{low}, {high}].')
  return ((volume - low) / (high - low)).astype(np.float32)


def patient_splits(patient_ids: Sequence[str],
                   fractions: Sequence[float] = SPLIT_FRACTIONS,
                   seed: int = 0) -> dict[str, tuple[str, ...]]:
  """Seeded train/validation/test split of patient ids by `fractions`."""
  if len(fractions) != len(SPLITS) or min(fractions) < 0 or not np.isclose(
      sum(fractions), 1.0):
    raise ValueError(
        f'split_fractions {tuple(fractions)}: expected {len(SPLITS)} '
        f'non-negative fractions summing to 1.')
  count = len(patient_ids)
  held = [int(round(f * count)) for f in fractions[1:]]
  parts = common.seeded_partition(patient_ids, (count - sum(held), *held), seed)
  return dict(zip(SPLITS, parts))


def _raw_examples(folders: Sequence[pathlib.Path], split: str,
                  fractions: Sequence[float],
                  seed: int) -> Iterator[common.KeyedExample]:
  patients = [folder.name for folder in folders]
  chosen = set(patient_splits(patients, fractions, seed)[split])
  for folder in folders:
    if folder.name not in chosen:
      continue
    for case_id, image_path, mask_path in _frame_files(folder):
      image, spacing = common.read_nifti(image_path, 'MRI frame')
      label, _ = common.read_nifti(mask_path, 'ground-truth mask')
      yield from common.volume_examples(
          _SPEC, case_id=case_id, image=normalise_volume(image, image_path),
          label=label, spacing=spacing, image_path=image_path,
          label_path=mask_path)


# ----------------------------------------------------------------------------
# npz copy.


def _npz_files(src: pathlib.Path, split: str) -> list[pathlib.Path]:
  """The split's files: those in lists_ACDC/<split>.txt, else all *.npz."""
  folder = src / _NPZ_FOLDERS[split]
  listing = src / 'lists_ACDC' / f'{_NPZ_FOLDERS[split]}.txt'
  if listing.is_file():
    names = common.read_with(
        listing, 'file list', lambda p: p.read_text().split())
    files = [folder / (n if n.endswith('.npz') else f'{n}.npz') for n in names]
    for path in files:
      if not path.is_file():
        raise FileNotFoundError(f'{path}: listed in {listing} but not found.')
    return files
  if not folder.is_dir():
    raise FileNotFoundError(
        f'{folder}: missing; the npz copy keeps the {split!r} split there.')
  return sorted(folder.glob('*.npz'))


def _npz_case(path: pathlib.Path, split: str) -> tuple[str, int]:
  """(case id 'patientXXX_ED', slice index) from a file name of the npz copy."""
  pattern = _NPZ_VOLUME_FILE if split == 'test' else _NPZ_SLICE_FILE
  match = pattern.fullmatch(path.name)
  if not match:
    raise ValueError(
        f'{path}: unexpected file name; the {split!r} split expects '
        f'{pattern.pattern}.')
  index = int(match.group(3)) if split != 'test' else 0
  return f'patient{match.group(1)}_{match.group(2)}', index


def _check_disjoint_patients(src: pathlib.Path) -> None:
  """Raises if a patient of the npz copy appears in two splits."""
  owners = {}
  for split in SPLITS:
    if not (src / _NPZ_FOLDERS[split]).is_dir():
      continue
    for path in _npz_files(src, split):
      patient = _npz_case(path, split)[0].split('_')[0]
      if owners.setdefault(patient, split) != split:
        raise ValueError(
            f'{path}: {patient} is in split {split!r} and also in '
            f'{owners[patient]!r}; splits must not share patients.')


def _npz_examples(src: pathlib.Path,
                  split: str) -> Iterator[common.KeyedExample]:
  _check_disjoint_patients(src)
  for path in _npz_files(src, split):
    case_id, index = _npz_case(path, split)
    arrays = common.read_arrays(path, ('img', 'label'))
    image = np.asarray(arrays['img'], np.float32)
    if split == 'test':
      yield from common.volume_examples(
          _SPEC, case_id=case_id, image=image, label=arrays['label'],
          spacing=common.UNIT_SPACING, image_path=path, label_path=path)
      continue
    if image.ndim != 2:
      raise ValueError(
          f'{path}: image of shape {image.shape}; expected a 2D slice.')
    yield common.slice_key(case_id, index), common.make_example(
        _SPEC, image=image[..., None], label=arrays['label'], case_id=case_id,
        slice_index=index, spacing=common.UNIT_SPACING, image_path=path,
        label_path=path)


def generate_examples(src: pathlib.Path | str | None, split: str, *,
                      split_fractions: Sequence[float] = SPLIT_FRACTIONS,
                      seed: int = 0,
                      include_testing: bool = False
                      ) -> Iterator[common.KeyedExample]:
  """Yields ('<case>_sliceNNN', example) for every slice of the split's frames.

  Examples hold 'image' (H, W, 1) float32, 'label' (H, W) uint8 in [0, 4),
  'case_id', 'slice_index' and 'spacing' (z, y, x) mm. Sizes are native.

  Args:
    src: folder holding the raw release or the npz copy.
    split: 'train', 'validation' or 'test'.
    split_fractions: raw release only: train/validation/test fractions of the
      patients (default 70/10/20).
    seed: raw release only: seed of the patient shuffle.
    include_testing: raw release only: also use the patients of `testing/`
      (the paper's protocol uses the 100 patients of `training/`).
  """
  common.check_split(split, SPLITS)
  src = common.require_folder(src, MANUAL_DOWNLOAD_INSTRUCTIONS)
  folders = _patient_folders(src, include_testing)
  if folders is not None:
    return _raw_examples(folders, split, split_fractions, seed)
  if any((src / f).is_dir() for f in _NPZ_FOLDERS.values()):
    return _npz_examples(src, split)
  raise common.layout_error(src, 'ACDC', LAYOUTS)
