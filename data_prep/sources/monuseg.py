"""MoNuSeg nuclei segmentation (H&E histology, 1000x1000) as binary examples.

Three layouts are read:

* official release: the training part (`Tissue Images/*.tif` beside
  `Annotations/*.xml`, e.g. in `MoNuSeg 2018 Training Data/`; 30 images) and the
  test part (`*.tif` and `*.xml` side by side, e.g. `MoNuSegTestData/`; 14
  images), each found in the source folder or up to two levels below it. The
  Aperio ImageScope XML (Annotations/Annotation/Regions/Region/Vertices/Vertex
  X= Y=, in pixels, X = column) is rasterised by filling every nucleus polygon
  (PIL.ImageDraw, outline included; regions with fewer than 3 vertices are
  skipped; a polygon with no vertex inside its image is refused). Validation
  holds out 6 training images: by default the 6 of the UCTransNet split, so
  both layouts give the same 24/6/14 split.
* split folders, `{Train,Val,Test}_Folder/{img,labelcol}` (UCTransNet copy):
  images PNG or TIFF RGB, masks `<stem>.png` in {0, 255}; foreground =
  mask > 0. The validation images are those of Val_Folder.
* train/test folders: the same without Val_Folder; validation is held out of
  Train_Folder as from the release's training part.

`val_cases=0` builds no validation split.

Images are (H, W, 3) uint8; case_id is the image stem; spacing is (1, 1, 1).
"""

import pathlib
from typing import Any, Iterator, Mapping, Sequence
from xml.etree import ElementTree

import numpy as np
from PIL import Image, ImageDraw

from data_prep import sources
from data_prep.sources import common

NAME = 'monuseg'
NUM_CLASSES = 2
IN_CHANNELS = 3
IMAGE_DTYPE = np.uint8
IS_VOLUMETRIC = False
SPLITS = ('train', 'validation', 'test')

# The validation images of the UCTransNet split (held out of the 30 training
# images of the official release).
UCTRANSNET_VAL_IMAGES = (
    'TCGA-18-5592-01Z-00-DX1', 'TCGA-AY-A8YK-01A-01-TS1',
    'TCGA-E2-A14V-01Z-00-DX1', 'TCGA-E2-A1B5-01Z-00-DX1',
    'TCGA-G9-6363-01Z-00-DX1', 'TCGA-HE-7129-01Z-00-DX1')
MIN_POLYGON_VERTICES = 3

_SPEC = common.ExampleSpec(NUM_CLASSES, IN_CHANNELS, IMAGE_DTYPE)
_TIFF_SUFFIXES = ('.tif', '.tiff')
RELEASE = 'official release'
LAYOUTS = {
    RELEASE: '<training part>/Tissue Images/*.tif + <training part>/'
             'Annotations/*.xml, and/or a test part folder (e.g. '
             'MoNuSegTestData/) holding *.tif + *.xml',
    common.SPLIT_FOLDERS_LAYOUT:
        '{Train,Val,Test}_Folder/img/<stem>.<png|tif> + '
        '{Train,Val,Test}_Folder/labelcol/<stem>.png',
    common.TRAIN_TEST_FOLDERS_LAYOUT:
        'the same with Train_Folder and Test_Folder only (validation images '
        'held out of Train_Folder)',
}
_VALIDATION_WHAT = 'MoNuSeg validation images'
MANUAL_DOWNLOAD_INSTRUCTIONS = common.instructions(
    NAME, 'MoNuSeg',
    'https://monuseg.grand-challenge.org/Data/ (training and test data), or a '
    'UCTransNet-style copy with Train/Val/Test folders.',
    LAYOUTS,
    notes='Split: train 24 / validation 6 (held out of the 30 training images) '
          '/ test 14.\n')


def read_polygons(path: pathlib.Path) -> list[np.ndarray]:
  """Nucleus polygons of an Aperio ImageScope XML: (N, 2) float (x, y) px."""
  root = common.read_with(
      path, 'annotation', lambda p: ElementTree.parse(p).getroot())
  polygons = []
  for region in root.iter('Region'):
    try:
      vertices = [(float(v.attrib['X']), float(v.attrib['Y']))
                  for v in region.iter('Vertex')]
    except (KeyError, ValueError) as err:
      raise ValueError(
          f'{path}: region {region.get("Id")} has a vertex without numeric '
          f'X/Y ({err}).') from err
    if len(vertices) >= MIN_POLYGON_VERTICES:
      polygons.append(np.asarray(vertices, np.float64))
  if not polygons:
    raise ValueError(
        f'{path}: holds no polygon regions (Region/Vertices/Vertex).')
  return polygons


def polygon_mask(polygons: Sequence[np.ndarray],
                 image_hw: tuple[int, int]) -> np.ndarray:
  """Fills polygons ((N, 2) x, y in px) into an (H, W) uint8 mask in {0, 1}."""
  height, width = image_hw
  canvas = Image.new('L', (width, height), 0)
  draw = ImageDraw.Draw(canvas)
  for polygon in polygons:
    draw.polygon([tuple(point) for point in polygon], fill=1, outline=1)
  return np.asarray(canvas, np.uint8)


def check_polygons_in_image(polygons: Sequence[np.ndarray],
                            image_hw: tuple[int, int],
                            path: pathlib.Path) -> None:
  """Refuses a polygon with no vertex inside the image.

  Filling clips such a polygon: it draws nothing, or, around the image, makes
  all of it foreground; either way the annotation does not fit the image.
  """
  height, width = image_hw
  for index, polygon in enumerate(polygons):
    x, y = polygon[:, 0], polygon[:, 1]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    if not inside.any():
      raise ValueError(
          f'{path}: polygon {index} (0-based, of {len(polygons)}) lies '
          f'entirely outside the {width}x{height} image: its vertices span '
          f'x {x.min():g}..{x.max():g}, y {y.min():g}..{y.max():g} px.')


def annotation_label(path: pathlib.Path,
                     image_hw: tuple[int, int]) -> np.ndarray:
  """Binary (H, W) label rasterised from an XML annotation whose polygons
  each have a vertex inside the image."""
  polygons = read_polygons(path)
  check_polygons_in_image(polygons, image_hw, path)
  return polygon_mask(polygons, image_hw)


def _folders_within(src: pathlib.Path, depth: int) -> list[pathlib.Path]:
  """`src` and the folders up to `depth` levels below it, sorted."""
  found, level = [src], [src]
  for _ in range(depth):
    level = [c for f in level for c in sorted(f.iterdir()) if c.is_dir()]
    found.extend(level)
  return found


def _release_parts(src: pathlib.Path
                   ) -> dict[str, tuple[list[pathlib.Path], list[pathlib.Path],
                                        pathlib.Path]]:
  """Official release parts: 'train'/'test' -> (tifs, xmls, xml folder)."""
  def files(folder, suffixes):
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in suffixes)

  parts = {}
  for folder in _folders_within(src, depth=2):
    tissue, annotations = folder / 'Tissue Images', folder / 'Annotations'
    if 'train' not in parts and tissue.is_dir() and annotations.is_dir():
      parts['train'] = (files(tissue, _TIFF_SUFFIXES),
                        files(annotations, ('.xml',)), annotations)
    tifs, xmls = files(folder, _TIFF_SUFFIXES), files(folder, ('.xml',))
    if 'test' not in parts and tifs and xmls:
      parts['test'] = (tifs, xmls, folder)
  return parts


def _release_split(src: pathlib.Path, parts, split: str,
                   val_cases: int | Sequence[str], seed: int
                   ) -> list[tuple[pathlib.Path, pathlib.Path]]:
  part = 'test' if split == 'test' else 'train'
  if part not in parts:
    raise FileNotFoundError(
        f'{src}: the official release\'s {part}ing part is missing; the '
        f'{split!r} split needs it (expected: '
        f'{LAYOUTS[RELEASE]}).')
  pairs = common.pair_by_stem(*parts[part])
  if split == 'test':
    return pairs
  return common.split_image_pairs(pairs, split, val_cases, seed,
                                  _VALIDATION_WHAT)


def plan_build(src: pathlib.Path, options: Mapping[str, Any]
               ) -> sources.BuildPlan:
  """The layout in `src`, the splits written and the options left unused."""
  layout = common.split_folders_layout(src)
  if layout is not None:
    return common.split_folders_plan(layout, options['val_cases'],
                                     'training images')
  if not _release_parts(src):
    raise common.layout_error(src, 'MoNuSeg', LAYOUTS)
  return sources.BuildPlan(
      RELEASE, sources.splits_with(validation=bool(options['val_cases'])),
      common.unused_seed(options['val_cases'], 'training images'))


def generate_examples(src: pathlib.Path | str | None, split: str, *,
                      val_cases: int | Sequence[str] = UCTRANSNET_VAL_IMAGES,
                      seed: int = 0) -> Iterator[common.KeyedExample]:
  """Yields (image stem, example) for every image of the split.

  Examples hold 'image' (H, W, 3) uint8 (1000x1000 in MoNuSeg), 'label' (H, W)
  uint8 in {0, 1}, 'case_id' (the stem), 'slice_index' 0, 'spacing' (1, 1, 1).

  Args:
    src: folder holding one of the LAYOUTS.
    split: 'train', 'validation' or 'test'.
    val_cases: official release and train/test folders: the training images
      held out for validation, as stems (default: the UCTransNet 6) or a
      count drawn by a seeded shuffle; 0 builds no validation split.
    seed: seed of a counted validation draw.
  """
  common.check_split(split, SPLITS)
  src = common.require_folder(src, MANUAL_DOWNLOAD_INSTRUCTIONS)
  layout = common.split_folders_layout(src)
  if layout is not None:
    return common.picture_examples(
        _SPEC, common.folder_layout_pairs(src, layout, split, val_cases, seed,
                                          _VALIDATION_WHAT),
        common.picture_label_from_mask)
  parts = _release_parts(src)
  if not parts:
    raise common.layout_error(src, 'MoNuSeg', LAYOUTS)
  return common.picture_examples(
      _SPEC, _release_split(src, parts, split, val_cases, seed),
      annotation_label)
