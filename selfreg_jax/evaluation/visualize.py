"""Colour overlays of segmentations for TensorBoard and PNG files."""

import numpy as np

# Class colours (RGB in [0, 1]); class 0 (background) is transparent.
PALETTE = np.array([
    [0.0, 0.0, 0.0], [0.90, 0.10, 0.10], [0.10, 0.75, 0.20],
    [0.15, 0.35, 0.95], [0.95, 0.80, 0.10], [0.80, 0.20, 0.85],
    [0.10, 0.85, 0.85], [1.00, 0.55, 0.10], [0.55, 0.35, 0.15],
], np.float32)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, C) image, C in {1, 3}, -> (H, W, 3) float32 in [0, 1] (min-max)."""
  image = np.asarray(image, np.float32)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  low, high = float(image.min()), float(image.max())
  return (image - low) / (high - low) if high > low else np.zeros_like(image)


def overlay(image: np.ndarray, label: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """Blends class colours of `label` (H, W) over `image` (H, W, C)."""
  rgb = to_rgb(image)
  label = np.asarray(label, np.int64)
  colours = PALETTE[label % len(PALETTE)]
  mask = (label > 0)[..., None]
  return np.where(mask, (1 - alpha) * rgb + alpha * colours, rgb)


def comparison_strip(image: np.ndarray, prediction: np.ndarray,
                     truth: np.ndarray) -> np.ndarray:
  """[input | prediction overlay | ground-truth overlay], (H, 3W, 3)."""
  return np.concatenate([to_rgb(image), overlay(image, prediction),
                         overlay(image, truth)], axis=1)
