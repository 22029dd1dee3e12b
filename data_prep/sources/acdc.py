"""ACDC cardiac cine MRI (ED and ES frames with masks) as 2D short-axis slices.

Classes: 0 background, 1 right ventricle, 2 myocardium, 3 left ventricle (the
release's own ids). Two layouts are read:

* raw release: `patientXXX/patientXXX_frameYY.nii.gz` + `..._frameYY_gt.nii.gz`
  per patient folder, inside `training/` (patients 001-100) and optionally
  `testing/` (101-150, when its masks are present), or directly in the source
  folder. The ED and ES frames come from `Info.cfg` (`ED:` / `ES:` lines) or,
  without it, from the `_gt` files present. A case is patient + frame, e.g.
  'patient001_frame01'. Each frame volume is min-max normalised on its own to
  [0, 1]: the recipe of the npz copy's intensities is not published (its
  authors sent their script by e-mail or a private link, MT-UNet issues #29
  and #46, where a user finds values in [-1, 1]), so this is our choice,
  and raw-built and copy-built images may differ in scale. Volumes are
  transposed from NIfTI (x, y, z) to (z, y, x) without flips (slice k is the
  k-th short-axis slice, indexed [y, x]); spacing is the header's voxel size
  as (z, y, x) mm.
* npz copy (MT-UNet / Swin-UNet / SelfReg-UNet ACDC data):
  `train/case_XXX_sliceED_N.npz` and `valid/...` 2D slices,
  `test/case_XXX_volume_ED.npz` (D, H, W) volumes, keys img and label,
  optionally listed by `lists_ACDC/{train,valid,test}.txt`. Images are taken
  as stored. The files name the phase, not the frame, so a case is e.g.
  'patient001_ED'. Spacing is not recorded, so it is (1, 1, 1).

Patients, never frames, are split, so both frames of a patient stay in one
split. By default both layouts give the reference split, the patient lists of
the npz copy: `REFERENCE_PATIENTS`, 70 train / 10 validation / 20 test. They
were read from the copy's `lists_ACDC/{train,valid,test}.txt` as shipped in
github.com/sotiraslab/AgileFormer (`lists/lists_ACDC/`, commit 9c00ee5; one
file per slice or volume, e.g. `case_019_sliceED_0.npz`, reduced here to
patient ids); the 20 test patients also match `lists/lists_ACDC/test_vol.txt`
of github.com/linbowang/PESpectralMedSeg, whose `train_npz.txt` covers the
other 80 (github.com/ChongQingNoSubway/SelfReg-UNet and MT-UNet ship no
ACDC list files). The raw release holds all 100 patients; the npz copy keeps
its test patients in `test/`. Validation is held out of the other (non-test)
patients: by default the 10 reference validation patients, so a copy-built set
has the copy's own train/valid folders' patients. `val_cases` may instead name
other patients or a count drawn by a seeded shuffle; 0 builds no validation
split (the 80 patients train). The raw release may also be split by a seeded
shuffle of the patients present (`patient_split='seeded'`, 70/10/20 by
default, with `testing/` optionally included).
"""

import pathlib
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from data_prep import sources
from data_prep.sources import common

NAME = 'acdc'
NUM_CLASSES = 4
IN_CHANNELS = 1
IMAGE_DTYPE = np.float32
IS_VOLUMETRIC = True
SPLITS = ('train', 'validation', 'test')

CLASS_NAMES = ('background', 'right ventricle', 'myocardium', 'left ventricle')


def _patients(*numbers: int) -> tuple[str, ...]:
  return tuple(f'patient{n:03d}' for n in numbers)


# The reference patient split (module docstring): split -> patient ids.
REFERENCE_PATIENTS = {
    'train': _patients(
        1, 4, 5, 6, 7, 10, 11, 13, 15, 16, 18, 20, 22, 23, 25, 26, 27, 28, 30,
        31, 32, 34, 35, 36, 37, 38, 39, 40, 43, 44, 45, 46, 47, 51, 52, 54, 56,
        57, 58, 59, 60, 62, 63, 65, 66, 68, 69, 70, 72, 73, 74, 75, 77, 78, 82,
        83, 84, 85, 86, 87, 89, 90, 91, 93, 94, 96, 97, 98, 99, 100),
    'validation': _patients(19, 21, 29, 33, 41, 50, 61, 71, 76, 80),
    'test': _patients(2, 3, 8, 9, 12, 14, 17, 24, 42, 48, 49, 53, 55, 64, 67,
                      79, 81, 88, 92, 95),
}
REFERENCE = 'reference'
SEEDED = 'seeded'
PATIENT_SPLITS = (REFERENCE, SEEDED)
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)

_SPEC = common.ExampleSpec(NUM_CLASSES, IN_CHANNELS, IMAGE_DTYPE)
_PATIENT_FOLDER = re.compile(r'patient(\d{3})')
_NPZ_FOLDERS = {'train': 'train', 'validation': 'valid', 'test': 'test'}
_NPZ_SLICE_FILE = re.compile(r'case_(\d{3})_slice(ED|ES)_(\d+)\.npz')
_NPZ_VOLUME_FILE = re.compile(r'case_(\d{3})_volume_(ED|ES)\.npz')
RAW = 'raw release'
NPZ = 'npz copy'
LAYOUTS = {
    RAW: 'training/patientXXX/patientXXX_frameYY.nii.gz + '
         'patientXXX_frameYY_gt.nii.gz (+ Info.cfg); testing/ optional; the '
         'patient folders may also sit directly in the folder',
    NPZ: 'train/case_XXX_sliceED_N.npz, valid/..., test/case_XXX_volume_ED.npz '
         '(keys img, label), optional lists_ACDC/{train,valid,test}.txt',
}
_VALIDATION_WHAT = 'ACDC validation patients'
MANUAL_DOWNLOAD_INSTRUCTIONS = common.instructions(
    NAME, 'ACDC',
    'raw release: https://humanheart-project.creatis.insa-lyon.fr/database/ '
    '(ACDC collection, free registration; formerly '
    'https://www.creatis.insa-lyon.fr/Challenge/acdc/); npz copy: the '
    'MT-UNet / Swin-UNet "ACDC" data.',
    LAYOUTS,
    notes='Split: the npz copy\'s patient lists, 70/10/20 patients, for both '
          'layouts.\n')


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


def seeded_patient_splits(patient_ids: Sequence[str],
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


def held_out_patient_splits(non_test: Sequence[str], test: Sequence[str],
                            val_cases: int | Sequence[str],
                            seed: int) -> dict[str, tuple[str, ...]]:
  """Patient ids per split when validation is held out of the non-test
  patients (`val_cases` and `seed` as common.hold_out takes them)."""
  train, validation = common.hold_out(non_test, val_cases, seed,
                                      _VALIDATION_WHAT)
  return {'train': train, 'validation': validation,
          'test': tuple(sorted(test))}


def reference_patient_splits(src: pathlib.Path, present: Sequence[str],
                             val_cases: int | Sequence[str],
                             seed: int) -> dict[str, tuple[str, ...]]:
  """The reference split of the raw release's patients `present` (all 100).

  Raises:
    FileNotFoundError: a reference patient is missing.
    ValueError: a patient present is not one of the reference patients.
  """
  reference = sorted(set().union(*REFERENCE_PATIENTS.values()))
  missing = sorted(set(reference) - set(present))
  if missing:
    raise FileNotFoundError(
        f'{src}: the reference patient split needs the {len(reference)} '
        f'patients of training/, and {len(missing)} are missing '
        f'({common.listed_ids(missing)}); to split the patients present, '
        f'build with --option patient_split={SEEDED}.')
  extra = sorted(set(present) - set(reference))
  if extra:
    raise ValueError(
        f'{src}: {common.listed_ids(extra)} are not among the reference '
        f'split\'s patients {reference[0]}..{reference[-1]}; to split them '
        f'too, build with --option patient_split={SEEDED}.')
  return held_out_patient_splits(
      REFERENCE_PATIENTS['train'] + REFERENCE_PATIENTS['validation'],
      REFERENCE_PATIENTS['test'], val_cases, seed)


def _check_patient_split(patient_split: str) -> None:
  if patient_split not in PATIENT_SPLITS:
    raise ValueError(f'patient_split {patient_split!r}: expected one of '
                     f'{PATIENT_SPLITS}.')


def _raw_patient_splits(src: pathlib.Path, folders: Sequence[pathlib.Path],
                        patient_split: str, val_cases: int | Sequence[str],
                        seed: int, fractions: Sequence[float]
                        ) -> dict[str, tuple[str, ...]]:
  """Patient ids per split of the raw release's patient `folders`."""
  _check_patient_split(patient_split)
  patients = [folder.name for folder in folders]
  if patient_split == SEEDED:
    return seeded_patient_splits(patients, fractions, seed)
  return reference_patient_splits(src, patients, val_cases, seed)


def _raw_examples(folders: Sequence[pathlib.Path],
                  patients: Sequence[str]) -> Iterator[common.KeyedExample]:
  for folder in folders:
    if folder.name not in patients:
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


def _has_npz_part(src: pathlib.Path, split: str) -> bool:
  """Whether the npz copy holds a folder or a file list for `split`."""
  return ((src / _NPZ_FOLDERS[split]).is_dir() or
          (src / 'lists_ACDC' / f'{_NPZ_FOLDERS[split]}.txt').is_file())


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
        f'{folder}: missing; the npz copy keeps its {split!r} files there.')
  return sorted(folder.glob('*.npz'))


def _npz_case(path: pathlib.Path, volume: bool) -> tuple[str, int]:
  """(case id 'patientXXX_ED', slice index) from a file name of the npz copy:
  a test volume if `volume`, else a train or valid slice."""
  pattern = _NPZ_VOLUME_FILE if volume else _NPZ_SLICE_FILE
  match = pattern.fullmatch(path.name)
  if not match:
    raise ValueError(
        f'{path}: unexpected file name; {path.parent.name}/ expects '
        f'{pattern.pattern}.')
  index = 0 if volume else int(match.group(3))
  return f'patient{match.group(1)}_{match.group(2)}', index


def _npz_patient(path: pathlib.Path, volume: bool) -> str:
  return _npz_case(path, volume)[0].split('_')[0]


def _npz_non_test_files(src: pathlib.Path) -> list[pathlib.Path]:
  """The copy's train files, then its valid files (if it has that part)."""
  files = _npz_files(src, 'train')
  if _has_npz_part(src, 'validation'):
    files += _npz_files(src, 'validation')
  return files


def _check_disjoint_patients(src: pathlib.Path) -> None:
  """Raises if a patient of the npz copy appears in two of its parts."""
  owners = {}
  for split in SPLITS:
    if not (src / _NPZ_FOLDERS[split]).is_dir():
      continue
    for path in _npz_files(src, split):
      patient = _npz_patient(path, volume=split == 'test')
      if owners.setdefault(patient, split) != split:
        raise ValueError(
            f'{path}: {patient} is in split {split!r} and also in '
            f'{owners[patient]!r}; splits must not share patients.')


def _npz_split_files(src: pathlib.Path, split: str,
                     val_cases: int | Sequence[str],
                     seed: int) -> list[pathlib.Path]:
  """The copy's files of `split`: test/'s, or the train and valid files of
  the split's patients when validation is held out of them."""
  _check_disjoint_patients(src)
  if split == 'test':
    return _npz_files(src, 'test')
  files = _npz_non_test_files(src)
  patients = sorted({_npz_patient(path, volume=False) for path in files})
  chosen = held_out_patient_splits(patients, (), val_cases, seed)[split]
  return [path for path in files
          if _npz_patient(path, volume=False) in chosen]


def _npz_examples(src: pathlib.Path, split: str,
                  val_cases: int | Sequence[str],
                  seed: int) -> Iterator[common.KeyedExample]:
  for path in _npz_split_files(src, split, val_cases, seed):
    case_id, index = _npz_case(path, volume=split == 'test')
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


# ----------------------------------------------------------------------------
# Both layouts.


def _layout(src: pathlib.Path) -> str:
  """The layout (a key of LAYOUTS) that `src` holds."""
  if _patient_folders(src, include_testing=False) is not None:
    return RAW
  if any((src / folder).is_dir() for folder in _NPZ_FOLDERS.values()):
    return NPZ
  raise common.layout_error(src, 'ACDC', LAYOUTS)


def plan_build(src: pathlib.Path, options: Mapping[str, Any]
               ) -> sources.BuildPlan:
  """The layout in `src`, the splits written and the options left unused."""
  layout = _layout(src)
  val_cases = options['val_cases']
  held_out = common.unused_seed(val_cases, 'patients')
  seeded_only = f'only patient_split={SEEDED} (raw release) uses it'
  if layout == NPZ:
    return sources.BuildPlan(
        NPZ, sources.splits_with(validation=bool(val_cases)), {
            'patient_split': 'the npz copy\'s test patients are those of its '
                             'test/ folder',
            'split_fractions': seeded_only, 'include_testing': seeded_only,
            **held_out})
  _check_patient_split(options['patient_split'])
  if options['patient_split'] == REFERENCE:
    # Refuses a partial release before anything is written.
    reference_patient_splits(
        src, [f.name for f in _patient_folders(src, include_testing=False)],
        val_cases, options['seed'])
    return sources.BuildPlan(
        RAW, sources.splits_with(validation=bool(val_cases)), {
            'split_fractions': seeded_only, 'include_testing': seeded_only,
            **held_out})
  folders = _patient_folders(src, options['include_testing'])
  validation = seeded_patient_splits([f.name for f in folders],
                                     options['split_fractions'],
                                     options['seed'])['validation']
  return sources.BuildPlan(
      RAW, sources.splits_with(validation=bool(validation)),
      {'val_cases': f'patient_split={SEEDED} takes the validation share from '
                    'split_fractions'})


def generate_examples(src: pathlib.Path | str | None, split: str, *,
                      val_cases: int | Sequence[str] = REFERENCE_PATIENTS[
                          'validation'],
                      seed: int = 0,
                      patient_split: str = REFERENCE,
                      split_fractions: Sequence[float] = SPLIT_FRACTIONS,
                      include_testing: bool = False
                      ) -> Iterator[common.KeyedExample]:
  """Yields ('<case>_sliceNNN', example) for every slice of the split's frames.

  Examples hold 'image' (H, W, 1) float32, 'label' (H, W) uint8 in [0, 4),
  'case_id', 'slice_index' and 'spacing' (z, y, x) mm. Sizes are native.

  Args:
    src: folder holding the raw release or the npz copy.
    split: 'train', 'validation' or 'test'.
    val_cases: the patients held out of the non-test ones for validation, as
      ids (default: the 10 reference validation patients) or a count drawn
      by a seeded shuffle; 0 builds no validation split (80 patients train).
      Not with patient_split='seeded'.
    seed: seed of a counted validation draw, or of the seeded patient split.
    patient_split: raw release only: 'reference' (the npz copy's patient
      lists; needs all 100 patients of training/) or 'seeded' (a seeded
      shuffle of the patients present by split_fractions).
    split_fractions: patient_split='seeded' only: train/validation/test
      fractions of the patients (default 70/10/20).
    include_testing: patient_split='seeded' only: also use the patients of
      `testing/` (the paper's protocol uses the 100 patients of `training/`).
  """
  common.check_split(split, SPLITS)
  src = common.require_folder(src, MANUAL_DOWNLOAD_INSTRUCTIONS)
  if _layout(src) == NPZ:
    return _npz_examples(src, split, val_cases, seed)
  folders = _patient_folders(src, include_testing)
  patients = _raw_patient_splits(src, folders, patient_split, val_cases, seed,
                                 split_fractions)[split]
  return _raw_examples(folders, patients)
