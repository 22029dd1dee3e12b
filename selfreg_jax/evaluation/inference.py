"""Slice-wise inference: whole slices resized to the model's input size.

Predictions follow the reference test code (docs/design.md section 4): every 2D
slice is resized to `image_size` with a cubic spline (`scipy.ndimage.zoom`,
order 3), the model runs with `train=False`, the class map (argmax, or
sigmoid > 0.5 for one-logit binary models) is resized back with nearest
neighbour (order 0) for volumes, or kept at `image_size` for the 2D data sets
(GlaS / MoNuSeg, whose labels are resized to `image_size` instead).

Batches are split over the devices of a mesh with one axis named 'data'
(`sharding.data_mesh`); variables are replicated. The last batch of a case is
padded up to the fixed batch size (so the function compiles once), and the
padding is dropped.
"""

import functools
from typing import Any, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from scipy import ndimage

from selfreg_jax.core import outputs
from selfreg_jax.core import sharding


def round_up_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh's device count >= `batch_size`."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  return -(-batch_size // mesh.size) * mesh.size


@functools.lru_cache(maxsize=8)
def make_predict_fn(model: nn.Module, mesh: jax.sharding.Mesh):
  """A jit-compiled predictor of `model`, sharded over `mesh`.

  Calls with equal (model, mesh) return the same function, so repeated
  validations reuse its compilation.

  Args:
    model: a segmentation model whose `apply(variables, x, train=False)`
      returns (logits (N, S, S, K), features).
    mesh: a mesh with one axis named 'data'.

  Returns:
    predict(variables, images) -> (N, S, S) uint8 class ids (a jax.Array
    every process can read), for images (N, S, S, C) float32 with N a
    multiple of `mesh.size`: argmax over the K logits, or
    sigmoid(logit) > 0.5 when K == 1. Variables are replicated, images split
    along N. A NumPy `images` is the global batch: every process must pass
    the same one.
  """
  if sharding.DATA_AXIS not in mesh.axis_names:
    raise ValueError(f'The mesh needs an axis named {sharding.DATA_AXIS!r}, '
                     f'got axes {mesh.axis_names}.')
  images_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated_sharding(mesh)

  def predict_classes(variables, images):
    return outputs.class_map(model.apply(variables, images, train=False)[0])

  compiled = jax.jit(predict_classes,
                     in_shardings=(replicated, images_sharding),
                     out_shardings=replicated)

  def predict(variables, images):
    if images.ndim != 4 or images.shape[0] % mesh.size:
      raise ValueError(
          f'predict expects images (N, S, S, C) with N a multiple of the '
          f'{mesh.size} devices of the mesh, got shape {images.shape}; pad '
          'the batch (as predict_volume and predict_images do).')
    if isinstance(images, np.ndarray):
      images = jax.make_array_from_callback(
          images.shape, images_sharding, lambda index: images[index])
    return compiled(variables, images)

  return predict


def _zoom_to(array: np.ndarray, shape: Sequence[int],
             order: int) -> np.ndarray:
  """Resizes the leading len(shape) axes of `array` to exactly `shape`.

  Uses `scipy.ndimage.zoom` with factors new / old per resized axis (1 for
  the remaining axes), as the reference code does.
  """
  shape = tuple(int(n) for n in shape)
  old = array.shape[:len(shape)]
  if old == shape:
    return array
  factors = [new / size for new, size in zip(shape, old)]
  factors += [1.0] * (array.ndim - len(shape))
  resized = ndimage.zoom(array, factors, order=order)
  if resized.shape[:len(shape)] != shape:
    raise RuntimeError(f'zoom of {array.shape} by {factors} gave '
                       f'{resized.shape}, not the requested {shape}.')
  return resized


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """(H, W, C) float image -> (S, S, C) or (h, w, C) float32, cubic spline.

  `size` is S for a square output or (h, w); channels are resized separately.
  """
  if image.ndim != 3:
    raise ValueError(f'resize_image expects (H, W, C), got {image.shape}.')
  shape = (size, size) if isinstance(size, (int, np.integer)) else size
  channels = [
      _zoom_to(image[..., c], shape, order=3) for c in range(image.shape[-1])
  ]
  return np.stack(channels, axis=-1).astype(np.float32, copy=False)


def resize_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """(H, W) class ids -> `shape` (h, w), nearest neighbour, same dtype."""
  if labels.ndim != 2:
    raise ValueError(f'resize_labels expects (H, W), got {labels.shape}.')
  return _zoom_to(labels, shape, order=0)


def _predict_chunks(predict_fn, variables: Any,
                    chunks: Iterable[np.ndarray],
                    batch_size: int) -> np.ndarray:
  """Predicts chunks of at most `batch_size` images, padding each to it.

  Every chunk is dispatched before the next one is produced, so producing
  (resizing) the next chunk on the host overlaps the device's work.

  Args:
    predict_fn: from `make_predict_fn`.
    variables: model variables (ideally already replicated).
    chunks: arrays (n, S, S, C) float32, 1 <= n <= batch_size.
    batch_size: the fixed batch size, a multiple of the mesh's devices.

  Returns:
    (sum of n, S, S) uint8 predictions, in order.
  """
  pending = []
  for chunk in chunks:
    count = len(chunk)
    if not 1 <= count <= batch_size:
      raise ValueError(f'A chunk holds {count} images; expected 1 to '
                       f'batch_size={batch_size}.')
    padding = np.zeros((batch_size - count,) + chunk.shape[1:], chunk.dtype)
    batch = np.concatenate([chunk, padding]) if len(padding) else chunk
    pending.append((predict_fn(variables, batch), count))
  fetched = jax.device_get([predictions for predictions, _ in pending])
  return np.concatenate([predictions[:count] for predictions, (_, count)
                         in zip(fetched, pending)])


def _chunks(count: int, batch_size: int) -> Iterator[range]:
  """Index ranges [0, b), [b, 2b), ... covering range(count)."""
  for start in range(0, count, batch_size):
    yield range(start, min(start + batch_size, count))


def predict_volume(predict_fn, variables: Any, image: np.ndarray,
                   image_size: int, batch_size: int) -> np.ndarray:
  """Predicts every slice of a volume and returns them at native size.

  Args:
    predict_fn: from `make_predict_fn`.
    variables: model variables.
    image: (D, H, W, C) float32, slices along axis 0.
    image_size: the model's input size S; slices are resized to (S, S) with a
      cubic spline, the predicted class maps back to (H, W) with nearest
      neighbour.
    batch_size: slices per batch (a multiple of the mesh's device count).

  Returns:
    (D, H, W) uint8 class ids.
  """
  if image.ndim != 4 or not len(image):
    raise ValueError(f'predict_volume expects a (D, H, W, C) volume with '
                     f'D >= 1, got shape {image.shape}.')
  chunks = (np.stack([resize_image(image[d], image_size) for d in rows])
            for rows in _chunks(len(image), batch_size))
  predictions = _predict_chunks(predict_fn, variables, chunks, batch_size)
  native_size = image.shape[1:3]
  return np.stack([resize_labels(p, native_size) for p in predictions])


def predict_images(predict_fn, variables: Any, images: Sequence[np.ndarray],
                   labels: Sequence[np.ndarray], image_size: int,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Predicts 2D images at the model's size (the GlaS / MoNuSeg protocol).

  Args:
    predict_fn: from `make_predict_fn`.
    variables: model variables.
    images: N arrays (H_i, W_i, C) float32; sizes may differ.
    labels: N matching arrays (H_i, W_i) of class ids.
    image_size: S; images are resized to (S, S) with a cubic spline, labels
      with nearest neighbour, and predictions stay at (S, S).
    batch_size: images per batch (a multiple of the mesh's device count).

  Returns:
    predictions (N, S, S) uint8 and resized labels (N, S, S) uint8.
  """
  if len(images) != len(labels) or not len(images):
    raise ValueError(f'predict_images needs as many labels as images (>= 1), '
                     f'got {len(images)} images and {len(labels)} labels.')
  for image, label in zip(images, labels):
    if image.ndim != 3 or image.shape[:2] != label.shape:
      raise ValueError(f'Image of shape {image.shape} does not match its '
                       f'label of shape {label.shape}; expected (H, W, C) '
                       'and (H, W).')
  chunks = (np.stack([resize_image(images[i], image_size) for i in rows])
            for rows in _chunks(len(images), batch_size))
  predictions = _predict_chunks(predict_fn, variables, chunks, batch_size)
  resized_labels = np.stack([
      resize_labels(np.asarray(label, np.uint8), (image_size, image_size))
      for label in labels
  ])
  return predictions, resized_labels
