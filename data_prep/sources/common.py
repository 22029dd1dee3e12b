"""Shared pieces of the per-dataset source readers.

Every source module turns one downloaded data set into 2D examples

  {'image': (H, W, C) image dtype, 'label': (H, W) uint8 class ids,
   'case_id': str, 'slice_index': int, 'spacing': (3,) float32 (z, y, x) mm}

and uses this module for what they have in common: reading files with errors
that name the file, checking each example against the data set's spec, seeded
splits by case, and the `{Train,Val,Test}_Folder/{img,labelcol}` layout that
the GlaS and MoNuSeg copies share.
"""

import dataclasses
import pathlib
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import h5py
import nibabel as nib
import numpy as np
from PIL import Image

from data_prep import sources
from selfreg_jax.interop import torch_io

Example = dict
KeyedExample = tuple[str, Example]
T = TypeVar('T')

# Spacing for 2D images and copies that do not record it.
UNIT_SPACING = (1.0, 1.0, 1.0)
NIFTI_SUFFIXES = ('.nii.gz', '.nii')
IMAGE_SUFFIXES = ('.png', '.tif', '.tiff', '.bmp', '.jpg', '.jpeg')
# Split name -> folder of the `{Train,Val,Test}_Folder/{img,labelcol}` layout.
SPLIT_FOLDERS = {
    'train': 'Train_Folder',
    'validation': 'Val_Folder',
    'test': 'Test_Folder',
}
# Layouts of histology copies: all three split folders, or Train and Test
# only (validation then held out of Train_Folder).
SPLIT_FOLDERS_LAYOUT = 'split folders'
TRAIN_TEST_FOLDERS_LAYOUT = 'train/test folders'
# Suffix some releases append to a mask's stem (GlaS: `train_1_anno.bmp`).
MASK_STEM_SUFFIX = '_anno'


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What a data set's examples must look like.

  Attributes:
    num_classes: number of classes including background; labels lie in
      [0, num_classes).
    in_channels: image channels (1 for CT/MRI, 3 for RGB histology).
    image_dtype: np.float32 (scaled CT/MRI) or np.uint8 (RGB).
  """
  num_classes: int
  in_channels: int
  image_dtype: type


# ----------------------------------------------------------------------------
# Source folders and splits.


def require_folder(src: pathlib.Path | str | None,
                   instructions: str) -> pathlib.Path:
  """`src` as a Path; FileNotFoundError with `instructions` if no folder."""
  if src is None:
    raise FileNotFoundError(f'No source folder was given.\n\n{instructions}')
  folder = pathlib.Path(src).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(
        f'{folder}: source folder does not exist.\n\n{instructions}')
  return folder


def layout_error(src: pathlib.Path, dataset: str,
                 layouts: Mapping[str, str]) -> FileNotFoundError:
  """The error for a folder that holds none of a data set's layouts."""
  expected = '; or '.join(f'the {name} ({what})'
                          for name, what in layouts.items())
  return FileNotFoundError(
      f'{src}: holds no recognised {dataset} layout; expected {expected}.')


def check_split(split: str, splits: Sequence[str]) -> None:
  if split not in splits:
    raise ValueError(
        f'Unknown split {split!r}; expected one of {tuple(splits)}.')


def seeded_partition(ids: Sequence[str], sizes: Sequence[int],
                     seed: int) -> tuple[tuple[str, ...], ...]:
  """Cuts `ids` into parts of the given sizes after a seeded shuffle.

  The shuffle starts from the sorted ids, so the result depends only on the set
  of ids, the sizes and the seed. Each part is returned sorted.
  """
  ordered = sorted(ids)
  if sum(sizes) != len(ordered) or min(sizes, default=0) < 0:
    raise ValueError(
        f'Cannot cut {len(ordered)} ids into parts of {tuple(sizes)}.')
  order = np.random.default_rng(seed).permutation(len(ordered))
  bounds = np.cumsum((0, *sizes))
  return tuple(
      tuple(sorted(ordered[i] for i in order[start:stop]))
      for start, stop in zip(bounds[:-1], bounds[1:]))


def hold_out(ids: Sequence[str], held: int | Sequence[str], seed: int,
             what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Splits `ids` into (kept, held out), both sorted.

  Args:
    ids: the candidate ids.
    held: how many ids to hold out (chosen by a seeded shuffle) or the ids
      themselves (one id may be given as a plain string).
    seed: seed of the shuffle.
    what: what is held out, for error messages (e.g. 'validation cases').
  """
  candidates = sorted(ids)
  if isinstance(held, str):
    held = (held,)
  if isinstance(held, (int, np.integer)):
    if not 0 <= held < len(candidates):
      raise ValueError(
          f'{what}: cannot hold out {held} of {len(candidates)} candidates.')
    return seeded_partition(candidates, (len(candidates) - held, held), seed)
  chosen = tuple(sorted(set(held)))
  unknown = [i for i in chosen if i not in candidates]
  if unknown:
    raise ValueError(
        f'{what}: {unknown} are not among the {len(candidates)} candidates '
        f'{listed_ids(candidates)}.')
  return tuple(i for i in candidates if i not in chosen), chosen


def listed_ids(ids: Sequence[str], most: int = 20) -> str:
  """`ids` as a list, or its first and last ids when there are over `most`."""
  if len(ids) <= most:
    return str(list(ids))
  return f'{ids[0]!r} .. {ids[-1]!r}'


def unused_seed(held: int | Sequence[str], what: str) -> dict[str, str]:
  """{'seed': why} unless `held` (as hold_out takes it) is a positive count,
  which a seeded shuffle draws."""
  counted = isinstance(held, (int, np.integer))
  if counted and held > 0:
    return {}
  given = 'is 0' if counted else 'names them'
  return {'seed': f'it seeds a draw of a count of {what}, and val_cases '
                  f'{given}'}


# ----------------------------------------------------------------------------
# Reading files.


def split_image_pairs(pairs: Sequence[tuple[pathlib.Path, pathlib.Path]],
                      split: str, held: int | Sequence[str], seed: int,
                      what: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """The (image, mask) pairs of `split` ('train' or 'validation') when the
  validation images are held out of `pairs` by image stem (see hold_out)."""
  kept, held_out = hold_out([image.stem for image, _ in pairs], held, seed,
                            what)
  chosen = set(held_out if split == 'validation' else kept)
  return [pair for pair in pairs if pair[0].stem in chosen]


def read_with(path: pathlib.Path, what: str,
              reader: Callable[[pathlib.Path], T]) -> T:
  """Runs `reader(path)`; a missing or undecodable file gets an error naming it.

  Any exception from the decoder means the file cannot be used, so all of them
  become a ValueError that names the file and the decoder's complaint.
  """
  if not path.is_file():
    raise FileNotFoundError(f'{path}: {what} not found.')
  try:
    return reader(path)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(
        f'{path}: unreadable {what} ({type(err).__name__}: {err}).') from err


def _decode_picture(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as picture:
    return np.asarray(picture)


def read_rgb(path: pathlib.Path) -> np.ndarray:
  """Reads an 8-bit RGB picture as (H, W, 3) uint8, dropping any alpha."""
  pixels = read_with(path, 'image', _decode_picture)
  if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] < 3):
    raise ValueError(
        f'{path}: single-channel (grayscale or palette) image of shape '
        f'{pixels.shape}; expected RGB with 3 channels.')
  if pixels.ndim != 3 or pixels.shape[-1] > 4:
    raise ValueError(
        f'{path}: image of shape {pixels.shape}; expected (H, W, 3) RGB.')
  if pixels.dtype != np.uint8:
    raise ValueError(
        f'{path}: image has dtype {pixels.dtype}; expected 8-bit RGB.')
  return np.ascontiguousarray(pixels[..., :3])


def read_mask(path: pathlib.Path) -> np.ndarray:
  """Reads a mask picture as (H, W) integers.

  Single-channel masks (8/16-bit, palette indices, 1-bit) are returned as
  stored. Colour masks are reduced to each pixel's largest colour channel (an
  alpha channel is dropped first), so any non-black pixel stays non-zero.
  """
  pixels = read_with(path, 'mask', _decode_picture)
  if pixels.ndim == 3 and pixels.shape[-1] in (2, 4):
    pixels = pixels[..., :-1]
  if pixels.ndim == 3:
    pixels = pixels.max(axis=-1)
  if pixels.ndim != 2:
    raise ValueError(f'{path}: mask of shape {pixels.shape}; expected (H, W).')
  return pixels


def binary_label(mask: np.ndarray) -> np.ndarray:
  """Foreground (any non-zero value, e.g. an instance id or 255) -> 1."""
  return (mask > 0).astype(np.uint8)


def find_nifti(folder: pathlib.Path, stem: str) -> pathlib.Path:
  """`folder/stem.nii.gz` or `folder/stem.nii`, whichever exists.

  The `.nii.gz` path is returned when neither exists (for error messages).
  """
  for suffix in NIFTI_SUFFIXES:
    path = folder / f'{stem}{suffix}'
    if path.is_file():
      return path
  return folder / f'{stem}{NIFTI_SUFFIXES[0]}'


def nifti_stem(path: pathlib.Path) -> str:
  """`img0001.nii.gz` -> `img0001`."""
  for suffix in NIFTI_SUFFIXES:
    if path.name.endswith(suffix):
      return path.name[:-len(suffix)]
  return path.stem


def _decode_nifti(path: pathlib.Path) -> tuple[np.ndarray, tuple[float, ...]]:
  volume = nib.load(path)
  return np.asarray(volume.dataobj), tuple(volume.header.get_zooms())


def read_nifti(path: pathlib.Path,
               what: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a 3D NIfTI volume, slices first.

  NIfTI stores voxels as (x, y, z); the volume is transposed to (z, y, x)
  without flips, so `volume[k]` is the k-th slice along the third voxel axis
  (axial for CT, short axis for cine MRI), indexed [y, x] as in the file's
  voxel grid. Trailing singleton axes (a 4D file holding one frame) are dropped.

  Returns:
    (volume (D, H, W) as stored (scaling slope applied), spacing (3,) float32
    (z, y, x) in mm from the header's voxel sizes).
  """
  voxels, zooms = read_with(path, what, _decode_nifti)
  while voxels.ndim > 3 and voxels.shape[-1] == 1:
    voxels = voxels[..., 0]
  if voxels.ndim != 3:
    raise ValueError(
        f'{path}: {what} has shape {voxels.shape}; expected a 3D volume.')
  spacing = np.asarray(zooms[:3][::-1], np.float32)
  return np.ascontiguousarray(voxels.transpose(2, 1, 0)), spacing


def _decode_arrays(path: pathlib.Path, keys: Sequence[str]
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
  if path.suffix in ('.h5', '.hdf5'):
    with h5py.File(path, 'r') as arrays:
      return {k: arrays[k][()] for k in keys if k in arrays}, list(arrays)
  arrays = torch_io.read_npz(path)
  return {k: arrays[k] for k in keys if k in arrays}, list(arrays)


def read_arrays(path: pathlib.Path,
                keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Reads named arrays from an `.npz` or HDF5 (`.h5`, `.hdf5`) file.

  An `.npz` is read whole by `torch_io.read_npz`, which refuses a file that
  would unpack to far more memory than its size before allocating any of it.
  """
  arrays, present = read_with(path, 'array file',
                              lambda p: _decode_arrays(p, keys))
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise ValueError(f'{path}: lacks arrays {missing}; it holds {present}, '
                     f'expected {list(keys)}.')
  return arrays


# ----------------------------------------------------------------------------
# Checking examples.


def integer_labels(values: np.ndarray, num_values: int,
                   source: pathlib.Path) -> np.ndarray:
  """Checks that `values` are whole numbers in [0, num_values); as uint8."""
  values = np.asarray(values)
  if values.size == 0:
    raise ValueError(f'{source}: empty label array of shape {values.shape}.')
  if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
    raise ValueError(
        f'{source}: labels have dtype {values.dtype}; expected numbers.')
  if np.issubdtype(values.dtype, np.floating) and not np.all(
      np.isfinite(values) & (values == np.round(values))):
    raise ValueError(f'{source}: labels hold non-integer values.')
  low, high = values.min(), values.max()
  if low < 0 or high >= num_values:
    raise ValueError(
        f'{source}: label values span [{low}, {high}]; expected class ids in '
        f'[0, {num_values}).')
  return values.astype(np.uint8)


def make_example(spec: ExampleSpec, *, image: np.ndarray, label: np.ndarray,
                 case_id: str, slice_index: int,
                 spacing: Sequence[float] | np.ndarray,
                 image_path: pathlib.Path,
                 label_path: pathlib.Path) -> Example:
  """Checks one 2D example against `spec` and returns it.

  Args:
    spec: the data set's spec.
    image: (H, W, spec.in_channels) of spec.image_dtype (finite if float).
    label: (H, W) whole-number class ids in [0, spec.num_classes), any dtype.
    case_id: the case (volume or picture) the example belongs to.
    slice_index: index of the slice in its volume (0 for 2D pictures).
    spacing: (z, y, x) voxel size in mm, positive.
    image_path: file the image came from (named by errors).
    label_path: file the label came from (named by errors).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != spec.in_channels:
    raise ValueError(
        f'{image_path}: image of shape {image.shape}; expected '
        f'(H, W, {spec.in_channels}).')
  if image.dtype != spec.image_dtype:
    raise ValueError(
        f'{image_path}: image has dtype {image.dtype}; expected '
        f'{np.dtype(spec.image_dtype)}.')
  if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
    raise ValueError(f'{image_path}: image holds NaN or infinite values.')
  label = np.asarray(label)
  if label.shape != image.shape[:2]:
    raise ValueError(
        f'{label_path}: label of shape {label.shape} does not match the image '
        f'{image_path} of shape {image.shape[:2]}.')
  label = integer_labels(label, spec.num_classes, label_path)
  spacing = np.asarray(spacing, np.float32)
  if spacing.shape != (3,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
    raise ValueError(f'{image_path}: voxel spacing {spacing.tolist()}; '
                     f'expected 3 positive sizes in mm.')
  return {
      'image': image,
      'label': label,
      'case_id': case_id,
      'slice_index': int(slice_index),
      'spacing': spacing,
  }


def slice_key(case_id: str, slice_index: int) -> str:
  return f'{case_id}_slice{slice_index:03d}'


def volume_examples(spec: ExampleSpec, *, case_id: str, image: np.ndarray,
                    label: np.ndarray, spacing: np.ndarray,
                    image_path: pathlib.Path,
                    label_path: pathlib.Path) -> Iterator[KeyedExample]:
  """Yields one single-channel example per slice of a (D, H, W) volume pair."""
  if image.ndim != 3:
    raise ValueError(
        f'{image_path}: volume of shape {image.shape}; expected (D, H, W).')
  if label.shape != image.shape:
    raise ValueError(
        f'{label_path}: label volume of shape {label.shape} does not match the '
        f'image volume {image_path} of shape {image.shape}.')
  for index in range(image.shape[0]):
    yield slice_key(case_id, index), make_example(
        spec, image=np.ascontiguousarray(image[index, :, :, None]),
        label=label[index],
        case_id=case_id, slice_index=index, spacing=spacing,
        image_path=image_path, label_path=label_path)


# ----------------------------------------------------------------------------
# Histology pictures: pairing and the {Train,Val,Test}_Folder layout.


def list_pictures(folder: pathlib.Path) -> list[pathlib.Path]:
  """Picture files (by suffix, any case) directly in `folder`, sorted."""
  return sorted(
      p for p in folder.iterdir()
      if p.is_file() and not p.name.startswith('.')
      and p.suffix.lower() in IMAGE_SUFFIXES)


def mask_key(mask_path: pathlib.Path) -> str:
  """The image stem a mask belongs to: `x.png` and `x_anno.bmp` -> `x`."""
  return mask_path.stem.removesuffix(MASK_STEM_SUFFIX)


def pair_by_stem(images: Sequence[pathlib.Path], masks: Sequence[pathlib.Path],
                 mask_folder: pathlib.Path
                 ) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """Pairs each image with the mask of the same stem (see `mask_key`).

  Raises:
    ValueError: two images (or two masks) share a stem.
    FileNotFoundError: an image has no mask or a mask has no image.
  """
  def by_key(paths, key, what):
    table = {}
    for path in paths:
      if key(path) in table:
        raise ValueError(
            f'{path}: {what} clashes with {table[key(path)]} (same stem).')
      table[key(path)] = path
    return table

  image_table = by_key(images, lambda p: p.stem, 'image')
  mask_table = by_key(masks, mask_key, 'mask')
  for stem, image in image_table.items():
    if stem not in mask_table:
      raise FileNotFoundError(
          f'{image}: image has no mask (expected {stem}.* or '
          f'{stem}{MASK_STEM_SUFFIX}.* in {mask_folder}).')
  for stem, mask in mask_table.items():
    if stem not in image_table:
      raise FileNotFoundError(f'{mask}: mask has no image named {stem}.*.')
  return [(image_table[s], mask_table[s]) for s in sorted(image_table)]


def split_folders_layout(src: pathlib.Path) -> str | None:
  """SPLIT_FOLDERS_LAYOUT when `src` holds `Val_Folder/` beside any
  `{Train,Test}_Folder/img`, TRAIN_TEST_FOLDERS_LAYOUT without it, None when
  it holds no such folder."""
  if not any((src / f / 'img').is_dir() for f in SPLIT_FOLDERS.values()):
    return None
  if (src / SPLIT_FOLDERS['validation']).is_dir():
    return SPLIT_FOLDERS_LAYOUT
  return TRAIN_TEST_FOLDERS_LAYOUT


def split_folders_plan(layout: str, held: int | Sequence[str], what: str,
                       release_options: Sequence[str] = ()
                       ) -> sources.BuildPlan:
  """The plan of a build from SPLIT_FOLDERS_LAYOUT or TRAIN_TEST_FOLDERS_LAYOUT.

  Args:
    layout: one of the two.
    held: the val_cases option (used by TRAIN_TEST_FOLDERS_LAYOUT only).
    what: what val_cases holds out (e.g. 'training images').
    release_options: options that only the official release uses.
  """
  unused = {name: 'only the official release uses it'
            for name in release_options}
  if layout == SPLIT_FOLDERS_LAYOUT:
    reason = (f'the validation images are those of '
              f'{SPLIT_FOLDERS["validation"]}/ (without that folder they are '
              f'held out of {SPLIT_FOLDERS["train"]}/)')
    return sources.BuildPlan(layout, sources.splits_with(validation=True), {
        **unused, 'val_cases': reason, 'seed': reason})
  return sources.BuildPlan(layout, sources.splits_with(validation=bool(held)),
                           {**unused, **unused_seed(held, what)})


def folder_layout_pairs(src: pathlib.Path, layout: str, split: str,
                        held: int | Sequence[str], seed: int, what: str
                        ) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(image, mask) paths of `split` in SPLIT_FOLDERS_LAYOUT, or in
  TRAIN_TEST_FOLDERS_LAYOUT where validation is held out of Train_Folder
  (`held`, `seed`, `what` as hold_out takes them)."""
  if layout == SPLIT_FOLDERS_LAYOUT or split == 'test':
    return split_folder_pairs(src, split)
  return split_image_pairs(split_folder_pairs(src, 'train'), split, held, seed,
                           what)


def split_folder_pairs(src: pathlib.Path,
                       split: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """(image, mask) paths of `split` in the `{Train,Val,Test}_Folder` layout."""
  root = src / SPLIT_FOLDERS[split]
  image_folder, mask_folder = root / 'img', root / 'labelcol'
  for folder in (image_folder, mask_folder):
    if not folder.is_dir():
      raise FileNotFoundError(f'{folder}: missing folder of split {split!r}.')
  pairs = pair_by_stem(
      list_pictures(image_folder), list_pictures(mask_folder), mask_folder)
  if not pairs:
    raise FileNotFoundError(
        f'{root}: the {split!r} split is empty (no pictures in '
        f'{image_folder.name}/ nor masks in {mask_folder.name}/).')
  return pairs


def picture_label_from_mask(mask_path: pathlib.Path,
                            image_hw: tuple[int, int]) -> np.ndarray:
  """Binary (H, W) label from a mask picture (foreground = non-zero)."""
  del image_hw  # The mask carries its own size; make_example compares them.
  return binary_label(read_mask(mask_path))


def picture_examples(
    spec: ExampleSpec, pairs: Sequence[tuple[pathlib.Path, pathlib.Path]],
    read_label: Callable[[pathlib.Path, tuple[int, int]], np.ndarray]
) -> Iterator[KeyedExample]:
  """Yields (image stem, example) for RGB pictures and their annotations.

  Args:
    spec: the data set's spec (3 channels, uint8).
    pairs: (image path, annotation path) per picture.
    read_label: (annotation path, image (H, W)) -> (H, W) class ids.
  """
  for image_path, label_path in pairs:
    image = read_rgb(image_path)
    label = read_label(label_path, image.shape[:2])
    yield image_path.stem, make_example(
        spec, image=image, label=label, case_id=image_path.stem,
        slice_index=0, spacing=UNIT_SPACING, image_path=image_path,
        label_path=label_path)


def instructions(name: str, dataset: str, where: str,
                 layouts: Mapping[str, str], notes: str = '') -> str:
  """Manual-download instructions, in the same shape for every source.

  Args:
    name: the source's NAME (as given to `python -m data_prep.build`).
    dataset: the data set's display name.
    where: where to download it.
    layouts: accepted layout name -> what the folder holds.
    notes: extra lines (each ending in a newline), e.g. the split.
  """
  accepted = '\n'.join(f'  - {layout}: {what}'
                       for layout, what in layouts.items())
  return (
      f'{dataset} must be downloaded by hand.\n'
      f'Where to get it: {where}\n'
      f'Accepted layouts of the source folder (manual_dir):\n{accepted}\n'
      f'{notes}'
      f'Build it with:\n'
      f'  python -m data_prep.build {name} --src /path/to/{dataset}')
