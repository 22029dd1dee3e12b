"""Writers of tiny copies of the data sets' layouts, in the real file formats.

Each writer builds one layout under a folder and returns what it wrote, so a
test can derive the expected examples on its own. All sizes live here.
"""

import pathlib
from typing import Sequence

import h5py
import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

# Volumes are written in NIfTI (x, y, z) order; non-square so that a wrong
# transpose shows.
VOLUME_SHAPE_XYZ = (16, 12, 4)
VOXEL_SIZE_XYZ = (0.8, 0.7, 2.5)
# Slices in the TransUNet copy / npz copies: (H, W), and test volume depth.
SLICE_HW = (12, 16)
SLICES_PER_CASE = 2
TEST_VOLUME_DEPTH = 3
# ACDC: patients written (70/10/20 -> 7/1/2) and the ED/ES frames.
ACDC_PATIENTS = 10
ACDC_FRAMES = (1, 7)
# The raw release's training part holds patients 001-100; a copy of all of
# them has smaller volumes.
ACDC_RELEASE_PATIENTS = 100
ACDC_RELEASE_SHAPE_XYZ = (6, 5, 2)
# Histology pictures: (H, W) per picture index, varying as in GlaS.
PICTURE_SIZES = ((24, 32), (28, 20), (20, 20))
MONUSEG_HW = (40, 48)


def picture_hw(index: int) -> tuple[int, int]:
  return PICTURE_SIZES[index % len(PICTURE_SIZES)]


def write_nifti(path: pathlib.Path, volume_xyz: np.ndarray,
                voxel_size=VOXEL_SIZE_XYZ) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  picture = nib.Nifti1Image(volume_xyz, np.diag((*voxel_size, 1.0)))
  picture.header.set_zooms((*voxel_size, *(1.0,) * (volume_xyz.ndim - 3)))
  nib.save(picture, path)


def write_rgb(path: pathlib.Path, pixels: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix in ('.tif', '.tiff'):
    tifffile.imwrite(path, pixels, photometric='rgb')
  else:
    Image.fromarray(pixels).save(path)


def write_gray(path: pathlib.Path, pixels: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels.astype(np.uint8), mode='L').save(path)


def random_rgb(rng: np.random.Generator, hw) -> np.ndarray:
  return rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)


def instance_mask(rng: np.random.Generator, hw, num_instances: int = 3
                  ) -> np.ndarray:
  """(H, W) uint8 with background 0 and rectangles labelled 1..num_instances."""
  mask = np.zeros(hw, np.uint8)
  for instance in range(1, num_instances + 1):
    top, left = rng.integers(0, hw[0] - 4), rng.integers(0, hw[1] - 4)
    mask[top:top + 4, left:left + 4] = instance
  return mask


# ----------------------------------------------------------------------------
# Synapse.


def btcv_volumes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(HU, raw label) volumes (x, y, z); labels use every BTCV id 0..13."""
  hu = rng.uniform(-1000, 1000, size=VOLUME_SHAPE_XYZ).astype(np.float32)
  label = rng.integers(0, 14, size=VOLUME_SHAPE_XYZ).astype(np.uint8)
  label.flat[:14] = np.arange(14)
  return hu.round().astype(np.int16), label


def write_btcv_raw(root: pathlib.Path, case_numbers: Sequence[int],
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """img/imgXXXX.nii.gz + label/labelXXXX.nii.gz; case -> (HU, raw label)."""
  rng = np.random.default_rng(seed)
  written = {}
  for number in case_numbers:
    hu, label = btcv_volumes(rng)
    write_nifti(root / 'img' / f'img{number:04d}.nii.gz', hu)
    write_nifti(root / 'label' / f'label{number:04d}.nii.gz', label)
    written[f'case{number:04d}'] = (hu, label)
  return written


def write_transunet_copy(root: pathlib.Path, train_cases: Sequence[str],
                         test_cases: Sequence[str], seed: int = 0
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """train_npz slices and test_vol_h5 volumes; returns case -> (D,H,W) pair."""
  rng = np.random.default_rng(seed)
  written = {}
  (root / 'train_npz').mkdir(parents=True, exist_ok=True)
  (root / 'test_vol_h5').mkdir(parents=True, exist_ok=True)
  for case_id in train_cases:
    image = rng.uniform(0, 1, (SLICES_PER_CASE, *SLICE_HW)).astype(np.float32)
    label = rng.integers(0, 9, image.shape).astype(np.float32)
    for index in range(SLICES_PER_CASE):
      np.savez(root / 'train_npz' / f'{case_id}_slice{index:03d}.npz',
               image=image[index], label=label[index])
    written[case_id] = (image, label)
  for case_id in test_cases:
    image = rng.uniform(0, 1, (TEST_VOLUME_DEPTH, *SLICE_HW)).astype(np.float32)
    label = rng.integers(0, 9, image.shape).astype(np.float32)
    with h5py.File(root / 'test_vol_h5' / f'{case_id}.npy.h5', 'w') as f:
      f['image'], f['label'] = image, label
    written[case_id] = (image, label)
  return written


# ----------------------------------------------------------------------------
# ACDC.


def write_acdc_raw(root: pathlib.Path, num_patients: int = ACDC_PATIENTS,
                   with_info: bool = True, part: str = 'training',
                   first_patient: int = 1, seed: int = 0,
                   shape_xyz=VOLUME_SHAPE_XYZ
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """<part>/patientXXX/ frames + _gt (+ Info.cfg); case -> (MRI, gt)."""
  rng = np.random.default_rng(seed)
  written = {}
  for number in range(first_patient, first_patient + num_patients):
    patient = f'patient{number:03d}'
    folder = root / part / patient
    folder.mkdir(parents=True)
    if with_info:
      (folder / 'Info.cfg').write_text(
          f'ED: {ACDC_FRAMES[0]}\nES: {ACDC_FRAMES[1]}\nGroup: NOR\n'
          f'Height: 180.0\nNbFrame: 10\nWeight: 70.0\n')
    for frame in ACDC_FRAMES:
      stem = f'{patient}_frame{frame:02d}'
      mri = rng.integers(3, 900, size=shape_xyz).astype(np.int16)
      gt = rng.integers(0, 4, size=shape_xyz).astype(np.uint8)
      write_nifti(folder / f'{stem}.nii.gz', mri)
      write_nifti(folder / f'{stem}_gt.nii.gz', gt)
      written[stem] = (mri, gt)
    write_nifti(folder / f'{patient}_4d.nii.gz',
                np.zeros((*shape_xyz, 2), np.int16))
  return written


def write_acdc_npz(root: pathlib.Path, patients: dict[str, Sequence[int]],
                   with_lists: bool = True, seed: int = 0
                   ) -> dict[str, np.ndarray]:
  """train/, valid/ slices and test/ volumes (+ lists_ACDC); file -> img."""
  rng = np.random.default_rng(seed)
  folders = {'train': 'train', 'validation': 'valid', 'test': 'test'}
  written = {}
  for split, numbers in patients.items():
    folder = root / folders[split]
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for number in numbers:
      for phase in ('ED', 'ES'):
        if split == 'test':
          shape = (TEST_VOLUME_DEPTH, *SLICE_HW)
          names.append(f'case_{number:03d}_volume_{phase}.npz')
        else:
          shape = SLICE_HW
          names.append(f'case_{number:03d}_slice{phase}_0.npz')
        img = rng.uniform(0, 1, shape).astype(np.float32)
        np.savez(folder / names[-1], img=img,
                 label=rng.integers(0, 4, shape).astype(np.float32))
        written[names[-1]] = img
    if with_lists:
      (root / 'lists_ACDC').mkdir(exist_ok=True)
      (root / 'lists_ACDC' / f'{folders[split]}.txt').write_text(
          ''.join(f'{n.removesuffix(".npz")}\n' for n in names))
  return written


# ----------------------------------------------------------------------------
# GlaS and MoNuSeg.


def write_glas_release(root: pathlib.Path, counts: dict[str, int],
                       seed: int = 0
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`<part>_N.bmp` + `<part>_N_anno.bmp` (instance ids); stem -> pair."""
  rng = np.random.default_rng(seed)
  written = {}
  for part, count in counts.items():
    for number in range(1, count + 1):
      stem, hw = f'{part}_{number}', picture_hw(number)
      image, mask = random_rgb(rng, hw), instance_mask(rng, hw)
      write_rgb(root / f'{stem}.bmp', image)
      write_gray(root / f'{stem}_anno.bmp', mask)
      written[stem] = (image, mask)
  return written


def write_split_folders(root: pathlib.Path, counts: dict[str, int],
                        image_suffix: str = '.png', mask_suffix: str = '.png',
                        hw=None, seed: int = 0, instance_ids: bool = False
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`{Train,Val,Test}_Folder/{img,labelcol}` for the splits in `counts`;
  masks {0,255}, or instance ids 1..3 if `instance_ids`; stem -> (image,
  binary label)."""
  rng = np.random.default_rng(seed)
  folders = {'train': 'Train_Folder', 'validation': 'Val_Folder',
             'test': 'Test_Folder'}
  written = {}
  for split, count in counts.items():
    for number in range(count):
      stem = f'{split}_image_{number}'
      size = hw or picture_hw(number)
      image, instances = random_rgb(rng, size), instance_mask(rng, size)
      mask = instances if instance_ids else (instances > 0) * 255
      write_rgb(root / folders[split] / 'img' / f'{stem}{image_suffix}', image)
      write_gray(root / folders[split] / 'labelcol' / f'{stem}{mask_suffix}',
                 mask)
      written[stem] = (image, (instances > 0).astype(np.uint8))
  return written


def rectangle_polygon(top: int, left: int, bottom: int, right: int) -> str:
  """Aperio Vertices of an axis-aligned rectangle (X = column, Y = row)."""
  corners = ((left, top), (right, top), (right, bottom), (left, bottom))
  return ''.join(f'<Vertex X="{x}.0" Y="{y}.0" Z="0"/>' for x, y in corners)


def aperio_xml(regions: Sequence[str]) -> str:
  """An ImageScope annotation file with the given Vertices contents."""
  body = ''.join(
      f'<Region Id="{i + 1}" Type="0"><Attributes/><Vertices>{vertices}'
      f'</Vertices></Region>' for i, vertices in enumerate(regions))
  return (
      '<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.252100">'
      '<Annotation Id="1"><Attributes><Attribute Name="Description" Id="0"/>'
      f'</Attributes><Regions><RegionAttributeHeaders/>{body}</Regions>'
      '<Plots/></Annotation></Annotations>')


def rectangles(rng: np.random.Generator, hw, count: int = 3
               ) -> list[tuple[int, int, int, int]]:
  """Random (top, left, bottom, right) inclusive rectangles inside hw."""
  boxes = []
  for _ in range(count):
    top, left = rng.integers(0, hw[0] - 6), rng.integers(0, hw[1] - 8)
    boxes.append((int(top), int(left), int(top + rng.integers(1, 6)),
                  int(left + rng.integers(1, 8))))
  return boxes


def write_monuseg_release(root: pathlib.Path, train_stems: Sequence[str],
                          test_stems: Sequence[str], seed: int = 0
                          ) -> dict[str, tuple[np.ndarray, list]]:
  """Official layout: TIFF images + XML rectangles; stem -> (image, boxes)."""
  rng = np.random.default_rng(seed)
  training = root / 'MoNuSeg 2018 Training Data'
  places = [(stem, training / 'Tissue Images', training / 'Annotations')
            for stem in train_stems]
  places += [(stem, root / 'MoNuSegTestData', root / 'MoNuSegTestData')
             for stem in test_stems]
  written = {}
  for stem, image_folder, xml_folder in places:
    image, boxes = random_rgb(rng, MONUSEG_HW), rectangles(rng, MONUSEG_HW)
    write_rgb(image_folder / f'{stem}.tif', image)
    xml_folder.mkdir(parents=True, exist_ok=True)
    (xml_folder / f'{stem}.xml').write_text(
        aperio_xml([rectangle_polygon(*box) for box in boxes]))
    written[stem] = (image, boxes)
  return written
