"""GlaS gland segmentation (colon histology, MICCAI 2015) as binary examples.

Three layouts are read:

* official release (Warwick QU): `train_N.bmp` / `train_N_anno.bmp` (85),
  `testA_N` (60) and `testB_N` (20) in one folder. Annotations label each
  gland instance with its own id; the label is gland (> 0) vs background. The
  release has no validation set, so `val_cases` training images are held out
  by a seeded shuffle; test is testA + testB (80).
* split folders, `{Train,Val,Test}_Folder/{img,labelcol}` (UCTransNet copy):
  each mask has the image's stem (optionally with `_anno`); foreground =
  mask > 0. The validation images are those of Val_Folder.
* train/test folders: `{Train,Test}_Folder` without Val_Folder, as several
  public repositories ship GlaS (85 train / 80 test PNGs, instance-labelled
  masks; foreground = mask > 0). As for the release, `val_cases` images are
  held out of Train_Folder for validation.

`val_cases=0` builds no validation split.

Images are (H, W, 3) uint8 at their native, varying size; case_id is the
image stem; spacing is (1, 1, 1).
"""

import pathlib
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from data_prep import sources
from data_prep.sources import common

NAME = 'glas'
NUM_CLASSES = 2
IN_CHANNELS = 3
IMAGE_DTYPE = np.uint8
IS_VOLUMETRIC = False
SPLITS = ('train', 'validation', 'test')

TEST_PARTS = ('testA', 'testB')

_SPEC = common.ExampleSpec(NUM_CLASSES, IN_CHANNELS, IMAGE_DTYPE)
_RELEASE_IMAGE = re.compile(r'(train|testA|testB)_\d+')
RELEASE = 'official release'
LAYOUTS = {
    RELEASE: 'train_N.bmp + train_N_anno.bmp, testA_N.bmp + testA_N_anno.bmp, '
             'testB_N... all in one folder',
    common.SPLIT_FOLDERS_LAYOUT:
        '{Train,Val,Test}_Folder/img/<stem>.<png|bmp|tif> + '
        '{Train,Val,Test}_Folder/labelcol/<stem>[_anno].<png|bmp>',
    common.TRAIN_TEST_FOLDERS_LAYOUT:
        'the same with Train_Folder and Test_Folder only (validation images '
        'held out of Train_Folder)',
}
MANUAL_DOWNLOAD_INSTRUCTIONS = common.instructions(
    NAME, 'GlaS',
    'https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/ (Warwick QU '
    'dataset, "Released 2016_07_08"; also mirrored on Kaggle), or a UCTransNet-'
    'style copy with Train/Val/Test folders.',
    LAYOUTS,
    notes='Official release split: train 85 (less the validation images held '
          'out of it) / test 80 = testA 60 + testB 20.\n')
_VALIDATION_WHAT = 'GlaS validation images'


def _release_pairs(
    src: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """All (image, annotation) pairs of the official release in `src`."""
  images, masks = [], []
  for path in common.list_pictures(src):
    if _RELEASE_IMAGE.fullmatch(path.stem):
      images.append(path)
    elif _RELEASE_IMAGE.fullmatch(common.mask_key(path)):
      masks.append(path)
  return common.pair_by_stem(images, masks, src)


def _release_split(src: pathlib.Path, split: str,
                   val_cases: int | Sequence[str], seed: int,
                   test_parts: Sequence[str]
                   ) -> list[tuple[pathlib.Path, pathlib.Path]]:
  pairs = _release_pairs(src)
  if split == 'test':
    unknown = set(test_parts) - set(TEST_PARTS)
    if unknown:
      raise ValueError(
          f'test_parts {sorted(unknown)}: expected some of {TEST_PARTS}.')
    return [pair for pair in pairs if pair[0].stem.split('_')[0] in test_parts]
  train = [pair for pair in pairs if pair[0].stem.startswith('train_')]
  return common.split_image_pairs(train, split, val_cases, seed,
                                  _VALIDATION_WHAT)


def _layout(src: pathlib.Path) -> str:
  """The layout (a key of LAYOUTS) that `src` holds."""
  folders = common.split_folders_layout(src)
  if folders is not None:
    return folders
  if any(_RELEASE_IMAGE.fullmatch(common.mask_key(p))
         for p in common.list_pictures(src)):
    return RELEASE
  raise common.layout_error(src, 'GlaS', LAYOUTS)


def plan_build(src: pathlib.Path, options: Mapping[str, Any]
               ) -> sources.BuildPlan:
  """The layout in `src`, the splits written and the options left unused."""
  layout = _layout(src)
  if layout == RELEASE:
    return sources.BuildPlan(
        layout, sources.splits_with(validation=bool(options['val_cases'])),
        common.unused_seed(options['val_cases'], 'training images'))
  return common.split_folders_plan(layout, options['val_cases'],
                                   'training images', ('test_parts',))


def generate_examples(src: pathlib.Path | str | None, split: str, *,
                      val_cases: int | Sequence[str] = 17,
                      seed: int = 0,
                      test_parts: Sequence[str] = TEST_PARTS
                      ) -> Iterator[common.KeyedExample]:
  """Yields (image stem, example) for every image of the split.

  Examples hold 'image' (H, W, 3) uint8, 'label' (H, W) uint8 in {0, 1},
  'case_id' (the stem), 'slice_index' 0 and 'spacing' (1, 1, 1).

  Args:
    src: folder holding one of the LAYOUTS.
    split: 'train', 'validation' or 'test'.
    val_cases: official release and train/test folders: the training images
      held out for validation, as a count drawn by a seeded shuffle (default
      17 = 20% of 85) or as stems; 0 builds no validation split.
    seed: seed of a counted validation draw.
    test_parts: official release only: which test parts form 'test'.
  """
  common.check_split(split, SPLITS)
  src = common.require_folder(src, MANUAL_DOWNLOAD_INSTRUCTIONS)
  layout = _layout(src)
  if layout == RELEASE:
    pairs = _release_split(src, split, val_cases, seed, test_parts)
  else:
    pairs = common.folder_layout_pairs(src, layout, split, val_cases, seed,
                                       _VALIDATION_WHAT)
  return common.picture_examples(_SPEC, pairs, common.picture_label_from_mask)
