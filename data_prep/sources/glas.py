"""GlaS gland segmentation (colon histology, MICCAI 2015) as binary examples.

Two layouts are read:

* official release (Warwick QU): `train_N.bmp` / `train_N_anno.bmp` (85),
  `testA_N` (60) and `testB_N` (20) in one folder. Annotations label each
  gland instance with its own id; the label is gland (> 0) vs background. The
  release has no validation set, so `val_cases` training images are held out
  by a seeded shuffle; test is testA + testB (80).
* `{Train,Val,Test}_Folder/{img,labelcol}` (UCTransNet copy): each mask has
  the image's stem (optionally with `_anno`); foreground = mask > 0.

Images are (H, W, 3) uint8 at their native, varying size; case_id is the
image stem; spacing is (1, 1, 1).
"""

import pathlib
import re
from typing import Iterator, Sequence

import numpy as np

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
LAYOUTS = {
    'official release': 'train_N.bmp + train_N_anno.bmp, testA_N.bmp + '
                        'testA_N_anno.bmp, testB_N... all in one folder',
    'split folders': '{Train,Val,Test}_Folder/img/<stem>.<png|bmp|tif> + '
                     '{Train,Val,Test}_Folder/labelcol/<stem>[_anno].<png|bmp>',
}
MANUAL_DOWNLOAD_INSTRUCTIONS = common.instructions(
    NAME, 'GlaS',
    'https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/ (Warwick QU '
    'dataset, "Released 2016_07_08"; also mirrored on Kaggle), or a UCTransNet-'
    'style copy with Train/Val/Test folders.',
    LAYOUTS,
    notes='Official release split: train 85 (less the validation images held '
          'out of it) / test 80 = testA 60 + testB 20.\n')


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
                                  'GlaS validation images')


def generate_examples(src: pathlib.Path | str | None, split: str, *,
                      val_cases: int | Sequence[str] = 17,
                      seed: int = 0,
                      test_parts: Sequence[str] = TEST_PARTS
                      ) -> Iterator[common.KeyedExample]:
  """Yields (image stem, example) for every image of the split.

  Examples hold 'image' (H, W, 3) uint8, 'label' (H, W) uint8 in {0, 1},
  'case_id' (the stem), 'slice_index' 0 and 'spacing' (1, 1, 1).

  Args:
    src: folder holding the official release or the split folders.
    split: 'train', 'validation' or 'test'.
    val_cases: official release only: number of training images held out for
      validation (seeded shuffle; default 17 = 20% of 85) or their stems.
    seed: official release only: seed of the validation draw.
    test_parts: official release only: which test parts form 'test'.
  """
  common.check_split(split, SPLITS)
  src = common.require_folder(src, MANUAL_DOWNLOAD_INSTRUCTIONS)
  if common.holds_split_folders(src):
    pairs = common.split_folder_pairs(src, split)
  elif any(_RELEASE_IMAGE.fullmatch(common.mask_key(p))
           for p in common.list_pictures(src)):
    pairs = _release_split(src, split, val_cases, seed, test_parts)
  else:
    raise common.layout_error(src, 'GlaS', LAYOUTS)
  return common.picture_examples(_SPEC, pairs, common.picture_label_from_mask)
