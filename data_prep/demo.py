"""Synthetic abdominal "phantom" volumes: the demo data set.

Each case is a small CT-like volume: an elliptical body with a darker fat rim,
a bright spine (unlabelled), and four labelled organ-like blobs (ellipsoids
with a lobed outline, bent by a smooth deformation that differs per case),
textured tissue and noise. Intensities are scaled to [0, 1] like the clipped
Synapse CT. Everything is drawn from a seed, so builds are reproducible, and
the default set (8 + 2 + 2 cases of 16-24 slices, 96-128 px) takes about a
second on one core.

Follows the source contract of `data_prep.sources`; no source folder needed.
"""

import math
from typing import Any, Iterator, Mapping

import numpy as np
from scipy import ndimage

from data_prep import sources

NAME = 'demo'
CLASS_NAMES = ('background', 'liver', 'left_kidney', 'right_kidney', 'spleen')
NUM_CLASSES = len(CLASS_NAMES)
IN_CHANNELS = 1
IMAGE_DTYPE = np.float32
IS_VOLUMETRIC = True
SPLITS = ('train', 'validation', 'test')
SYNTHETIC = 'synthetic'
LAYOUTS = {SYNTHETIC: 'no source folder: the phantoms are drawn from the seed'}
MANUAL_DOWNLOAD_INSTRUCTIONS = ''

# Organ templates in body coordinates (each axis spans [-1, 1]; y grows towards
# the back, x towards the patient's left): class id, centre (z, y, x),
# radii (z, y, x), mean intensity. Each case jitters all of them.
_ORGANS = (
    (1, (0.15, -0.1, -0.35), (0.9, 0.45, 0.4), 0.62),
    (4, (0.1, 0.2, 0.5), (0.5, 0.2, 0.17), 0.55),
    (2, (-0.25, 0.35, 0.33), (0.5, 0.15, 0.11), 0.75),
    (3, (-0.3, 0.35, -0.3), (0.5, 0.15, 0.11), 0.75),
)
_BACKGROUND_INTENSITY = 0.02
_FAT_INTENSITY = 0.22
_TISSUE_INTENSITY = 0.38
_SPINE_INTENSITY = 0.95
_FAT_RIM = 0.12  # Fraction of the body radius that is fat.


def _smooth_field(rng: np.random.Generator, grid, amplitude: float,
                  num_waves: int = 3) -> np.ndarray:
  """A smooth random field: a sum of low-frequency plane waves over `grid`."""
  field = 0.0
  for _ in range(num_waves):
    frequency = rng.uniform(0.3, 1.0, size=3) * rng.choice([-1, 1], size=3)
    phase = rng.uniform(0, 2 * np.pi)
    argument = sum(f * g for f, g in zip(frequency, grid))
    field = field + np.sin(np.pi * argument + phase)
  return ((amplitude / num_waves) * field).astype(np.float32)


def _organ_mask(rng: np.random.Generator, grid, centre, radii) -> np.ndarray:
  """Boolean mask of a jittered ellipsoid with a lobed outline."""
  z, y, x = grid
  centre = [float(c) + rng.uniform(-0.05, 0.05) for c in centre]
  radii = [float(r) * rng.uniform(0.85, 1.15) for r in radii]
  angle = rng.uniform(-0.3, 0.3)
  cos, sin = math.cos(angle), math.sin(angle)
  dy, dx = y - centre[1], x - centre[2]
  u = cos * dy - sin * dx
  v = sin * dy + cos * dx
  # The lobed outline scales the in-plane radius, so it keeps its shape
  # towards the organ's poles.
  lobes = rng.integers(2, 5)
  outline = 1 + 0.15 * np.sin(lobes * np.arctan2(u, v) + rng.uniform(0, 6.3))
  in_plane = ((u / radii[1])**2 + (v / radii[2])**2) / outline**2
  return ((z - centre[0]) / radii[0])**2 + in_plane < 1


def make_phantom(
    rng: np.random.Generator, *, depth: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one phantom volume.

  Returns:
    image: (depth, height, width) float32 in [0, 1].
    label: (depth, height, width) uint8 class ids in [0, NUM_CLASSES).
  """
  axes = [
      np.linspace(-1, 1, n, dtype=np.float32) for n in (depth, height, width)
  ]
  z, y, x = np.meshgrid(*axes, indexing='ij', sparse=True)
  # A smooth deformation bends every structure of the case the same way.
  y = y + _smooth_field(rng, (z, y, x), amplitude=0.06)
  x = x + _smooth_field(rng, (z, y, x), amplitude=0.06)
  grid = (z, y, x)

  body_radius = np.sqrt((y / rng.uniform(0.72, 0.85))**2 +
                        (x / rng.uniform(0.85, 0.95))**2)
  image = np.where(body_radius < 1, _FAT_INTENSITY, _BACKGROUND_INTENSITY)
  image = np.where(body_radius < 1 - _FAT_RIM, _TISSUE_INTENSITY, image)
  spine = (y - 0.55)**2 + x**2 < rng.uniform(0.1, 0.13)**2
  image = np.where(spine, _SPINE_INTENSITY, image)

  label = np.zeros((depth, height, width), np.uint8)
  for class_id, centre, radii, intensity in _ORGANS:
    organ = _organ_mask(rng, grid, centre, radii) & (body_radius < 1 - _FAT_RIM)
    organ = np.broadcast_to(organ, label.shape)
    label[organ] = class_id
    image = np.where(organ, intensity + rng.uniform(-0.04, 0.04), image)

  image = np.broadcast_to(image, label.shape).astype(np.float32)
  image = ndimage.gaussian_filter(image, sigma=(0, 0.8, 0.8))
  texture = ndimage.gaussian_filter(
      rng.standard_normal(label.shape, dtype=np.float32), sigma=(0.8, 2, 2))
  texture *= 0.04 / max(float(texture.std()), 1e-6)
  image += np.where(body_radius < 1, texture, 0)
  image += rng.normal(0, 0.02, size=label.shape).astype(np.float32)
  return np.clip(image, 0, 1).astype(np.float32), label


def plan_build(src: None, options: Mapping[str, Any]) -> sources.BuildPlan:
  """Every option applies; num_validation_cases=0 builds no validation split."""
  del src  # The data are synthetic.
  return sources.BuildPlan(SYNTHETIC, sources.splits_with(
      validation=options['num_validation_cases'] > 0))


def generate_examples(
    src=None,
    split: str = 'train',
    *,
    num_train_cases: int = 8,
    num_validation_cases: int = 2,
    num_test_cases: int = 2,
    min_slices: int = 16,
    max_slices: int = 24,
    min_size: int = 96,
    max_size: int = 128,
    seed: int = 0,
) -> Iterator[tuple[str, dict]]:
  """Yields the axial slices of the phantom cases of `split`.

  Args:
    src: unused (the data are synthetic); accepted for the source contract.
    split: one of SPLITS.
    num_train_cases, num_validation_cases, num_test_cases: cases per split
      (num_validation_cases=0 builds no validation split).
    min_slices, max_slices: range of the number of slices of a case.
    min_size, max_size: range of the height and of the width (drawn
      separately, so slices need not be square).
    seed: seed of everything; case `i` of a split depends only on
      (seed, split, i).

  Yields:
    (key, example) with example = {'image': (H, W, 1) float32 in [0, 1],
    'label': (H, W) uint8, 'case_id': str, 'slice_index': int,
    'spacing': (3,) float32 (z, y, x) in mm}.
  """
  del src
  if split not in SPLITS:
    raise ValueError(f'Unknown demo split {split!r}; valid: {SPLITS}.')
  if not 1 <= min_slices <= max_slices:
    raise ValueError(f'Need 1 <= min_slices <= max_slices, got '
                     f'{min_slices}, {max_slices}.')
  if not 8 <= min_size <= max_size:
    raise ValueError(
        f'Need 8 <= min_size <= max_size, got {min_size}, {max_size}.')
  num_cases = {'train': num_train_cases, 'validation': num_validation_cases,
               'test': num_test_cases}[split]
  for case_index in range(num_cases):
    rng = np.random.default_rng([seed, SPLITS.index(split), case_index])
    depth = int(rng.integers(min_slices, max_slices + 1))
    height, width = (int(n) for n in rng.integers(min_size, max_size + 1, 2))
    in_plane = rng.uniform(0.6, 0.9)
    spacing = np.array([rng.uniform(2.5, 5.0), in_plane, in_plane], np.float32)
    image, label = make_phantom(rng, depth=depth, height=height, width=width)
    case_id = f'{split}_{case_index:03d}'
    for slice_index in range(depth):
      yield f'{case_id}_{slice_index:03d}', {
          'image': image[slice_index, :, :, None],
          'label': label[slice_index],
          'case_id': case_id,
          'slice_index': slice_index,
          'spacing': spacing,
      }
