"""Grain input pipeline over the data sets built by `data_prep.build`.

Data sets are TFDS ArrayRecord folders of native-resolution 2D slices (see
`data_prep/builders.py`); they are read through TFDS's random-access data
source, so no TensorFlow is imported.

Training (`create_train_loader`): each process reads its own strided shard of
the training split, shuffled afresh every epoch, repeated forever; every slice
is (optionally) augmented as in docs/design.md section 3 and resized to
`image_size`, then slices are batched. Randomness comes from grain's
per-record generators, so the stream depends only on the seed and the
process index (not on the number of worker processes) and the iterator's
state (`get_state()` / `set_state()`) resumes it exactly.
`prefetch_to_device` puts batches on the devices ahead of the steps using
them, keeping that exactness.

Evaluation (`iterate_cases`): whole cases rebuilt from their slices.

A built set is opened once per run (`DataSet.open`, checked against
config.dataset) and the opened `DataSet` is passed to the loader and the case
iterator.
"""

import collections
import copy
import dataclasses
import math
import pathlib
import re
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
import grain
import jax
import ml_collections
import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

from selfreg_jax.common import cli

# Probability of each augmentation branch (docs/design.md section 3).
_ROT_FLIP_PROBABILITY = 0.5
_ROTATE_PROBABILITY = 0.5
_MAX_ROTATION_DEGREES = 20
_VERSION_DIR = re.compile(r'^\d+\.\d+\.\d+$')
# Records read at once while indexing a split by case.
_INDEX_CHUNK = 256


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """A whole case at native resolution.

  Attributes:
    case_id: identifier of the case (patient, volume or 2D image).
    image: (D, H, W, C) float32; uint8 RGB scaled to [0, 1].
    label: (D, H, W) uint8 class ids.
    spacing: (z, y, x) voxel size in mm ((1, 1, 1) when unknown).
  """
  case_id: str
  image: np.ndarray
  label: np.ndarray
  spacing: tuple[float, float, float]


# ----------------------------------------------------------------------------
# Opening a built data set.


def open_dataset(
    name: str, data_dir: str | pathlib.Path | None
) -> tfds.core.DatasetBuilder:
  """Opens the built data set `name` (e.g. 'selfreg_synapse') for reading.

  Args:
    name: TFDS name of the data set.
    data_dir: TFDS data directory; None or '' for $TFDS_DATA_DIR or
      ~/tensorflow_datasets.

  Raises:
    FileNotFoundError: the data set is not built there (names the command
      that builds it).
  """
  data_dir = pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
  dataset_root = data_dir / name
  built = [
      p for p in dataset_root.glob('*/dataset_info.json')
      if _VERSION_DIR.match(p.parent.name)
  ]
  if not built:
    short_name = name.removeprefix('selfreg_')
    src = '' if short_name == 'demo' else ' --src DOWNLOADED_FOLDER'
    raise FileNotFoundError(
        f'{dataset_root}: data set {name!r} is not built; build it with '
        f'`python -m data_prep.build {short_name}{src} --out {data_dir}`.')
  # Read from the folder (the newest version), never through the builder
  # class: a data_prep builder class, registered once data_prep.builders is
  # imported, plans a build from its source folder when constructed.
  newest = max(built, key=lambda path: tuple(
      int(part) for part in path.parent.name.split('.')))
  return tfds.builder_from_directory(str(newest.parent))


def generic_class_names(num_classes: int) -> tuple[str, ...]:
  """Names of foreground classes 1..C-1 for a data set that records none:
  ('foreground',) for a binary set, else ('class_1', ...)."""
  if num_classes == 2:
    return ('foreground',)
  return tuple(f'class_{k}' for k in range(1, num_classes))


@dataclasses.dataclass(frozen=True, eq=False)
class DataSet:
  """A built data set, opened once, and its facts (from its metadata).

  Attributes:
    builder: the TFDS builder read from the data set's folder.
    num_classes: classes, background included.
    in_channels: image channels.
    volumetric: whether cases are volumes (else 2D images).
    class_names: names of the foreground classes 1..C-1, as the build
      recorded them (generic ones for sets built before names were recorded).
  """
  builder: tfds.core.DatasetBuilder
  num_classes: int
  in_channels: int
  volumetric: bool
  class_names: tuple[str, ...]

  @classmethod
  def open(cls, dataset_config: ml_collections.ConfigDict) -> 'DataSet':
    """Opens config.dataset's built set and checks it against the config.

    Raises:
      FileNotFoundError: the set is not built (names the build command).
      UserError: its classes, channels or kind (volumes or 2D images) differ
        from dataset_config.num_classes / in_channels / volumetric.
    """
    builder = open_dataset(dataset_config.name, dataset_config.data_dir)
    metadata = builder.info.metadata or {}
    try:
      num_classes = int(metadata['num_classes'])
    except (KeyError, TypeError) as e:
      raise cli.UserError(f'{builder.data_dir}/metadata.json: no num_classes; '
                          'was this data set built by data_prep.build?') from e
    found = {'num_classes': num_classes,
             'in_channels': int(builder.info.features['image'].shape[-1]),
             'volumetric': bool(metadata.get('is_volumetric',
                                             dataset_config.volumetric))}
    expected = {key: type(value)(dataset_config[key])
                for key, value in found.items()}
    if found != expected:
      raise cli.UserError(
          f'{builder.data_dir}: data set has {found} but config.dataset asks '
          f'for {expected}.')
    names = metadata.get('class_names')
    names = (tuple(names[1:]) if names and len(names) == num_classes
             else generic_class_names(num_classes))
    return cls(builder=builder, class_names=names, **found)

  @property
  def directory(self) -> str:
    return self.builder.data_dir

  def has_split(self, split: str) -> bool:
    return split in self.builder.info.splits

  def num_slices(self, split: str) -> int:
    """Slices (2D images) in `split`."""
    self._check_split(split)
    return self.builder.info.splits[split].num_examples

  def source(self, split: str, **kwargs) -> Any:
    """The random-access records of `split` (TFDS data source)."""
    self._check_split(split)
    return self.builder.as_data_source(split, **kwargs)

  def _check_split(self, split: str) -> None:
    if not self.has_split(split):
      raise cli.UserError(
          f'{self.directory}: no split {split!r}; available: '
          f'{sorted(self.builder.info.splits)}.')


def steps_per_epoch(num_slices: int, batch_size: int) -> int:
  """ceil(num_slices / batch_size), as the public trainers count.

  Their PyTorch loaders keep each epoch's last, partial batch; ours are all
  full (one compiled program, a batch divisible by the devices), the stream
  running on into the next pass over the data. So an epoch has the public
  number of steps and learning-rate updates, and sees
  ceil(N / B) * B slices, B - (N mod B) more than N (Synapse Swin-UNet:
  70 steps of 32 = 2240 slices for 2211; +1.3%).
  """
  return max(1, math.ceil(num_slices / batch_size))


# ----------------------------------------------------------------------------
# Per-slice transforms (NumPy / SciPy; run in grain workers).


def to_float_image(image: np.ndarray) -> np.ndarray:
  """uint8 images scaled to float32 [0, 1]; float images as float32."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32, copy=False)


def augment_slice(image: np.ndarray, label: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Random rot90+flip, else maybe a small rotation (docs/design.md section 3).

  With p=0.5: rot90 by k in 0..3 and a flip on a random axis; otherwise with
  p=0.5: rotation by an integer angle in [-20, 20) degrees about the centre,
  nearest neighbour for image and label, same shape. Both arrays move
  together.

  Args:
    image: (H, W, C) float32.
    label: (H, W) integer class ids.
    rng: generator for this slice.

  Returns:
    (image, label), contiguous; (W, H, ...) after an odd rot90.
  """
  if rng.random() < _ROT_FLIP_PROBABILITY:
    k = int(rng.integers(4))
    axis = int(rng.integers(2))
    image = np.flip(np.rot90(image, k, axes=(0, 1)), axis)
    label = np.flip(np.rot90(label, k, axes=(0, 1)), axis)
  elif rng.random() < _ROTATE_PROBABILITY:
    angle = int(rng.integers(-_MAX_ROTATION_DEGREES, _MAX_ROTATION_DEGREES))
    image = ndimage.rotate(image, angle, axes=(1, 0), order=0, reshape=False)
    label = ndimage.rotate(label, angle, axes=(1, 0), order=0, reshape=False)
  return np.ascontiguousarray(image), np.ascontiguousarray(label)


def resize_slice(image: np.ndarray, label: np.ndarray,
                 size: int) -> tuple[np.ndarray, np.ndarray]:
  """Resizes to (size, size): cubic spline per image channel, nearest label.

  Args:
    image: (H, W, C) float32.
    label: (H, W) integer class ids.
    size: output height and width in pixels.

  Returns:
    image (size, size, C) float32 and label (size, size), label's dtype.
  """
  height, width = label.shape
  if (height, width) == (size, size):
    return image, label
  zoom = (size / height, size / width)
  image = np.stack([
      ndimage.zoom(image[..., c], zoom, order=3)
      for c in range(image.shape[-1])
  ], axis=-1)
  return image, ndimage.zoom(label, zoom, order=0)


@dataclasses.dataclass(frozen=True)
class TrainSliceTransform(grain.transforms.RandomMap):
  """Record -> {'image': (S, S, C) float32, 'label': (S, S) int32}."""
  image_size: int
  augment: bool

  def random_map(self, element: Mapping[str, Any],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = to_float_image(element['image'])
    label = element['label']
    if self.augment:
      image, label = augment_slice(image, label, rng)
    image, label = resize_slice(image, label, self.image_size)
    return {'image': image, 'label': label.astype(np.int32)}


# ----------------------------------------------------------------------------
# Training stream.


def _ensure_absl_flags_parsed() -> None:
  """Lets grain's worker processes read their absl flags outside absl apps.

  Grain's multiprocessing reads absl flags, which raise until parsed; an
  absl app parses them in `app.run`, other programs (tests, notebooks) keep
  the defaults.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(source: Sequence[Mapping[str, Any]], *, batch_size: int,
                  image_size: int, augment: bool, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0) -> grain.IterDataset:
  """The infinite, shuffled, batched training stream of one process.

  Args:
    source: random-access records ({'image': (H, W, C), 'label': (H, W),
      ...}), e.g. a TFDS data source.
    batch_size: slices per batch of this process.
    image_size: output height and width S.
    augment: apply `augment_slice` before resizing.
    seed: non-negative seed of shuffling and augmentation.
    process_index, process_count: this process reads records
      process_index, process_index + process_count, ...
    num_workers: grain worker processes (0: transform in this process).

  Returns:
    An IterDataset of {'image': (batch_size, S, S, C) float32,
    'label': (batch_size, S, S) int32}.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, process_count={process_count}).')
  if len(source) < process_count:
    raise ValueError(f'{len(source)} records cannot be shared by '
                     f'{process_count} processes.')
  if seed < 0:
    raise ValueError(f'seed must be non-negative, got {seed}.')
  shuffle_seed, augment_seed = np.random.SeedSequence(
      [seed, process_index]).generate_state(2)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.shuffle(seed=int(shuffle_seed)).repeat()
  ds = ds.random_map(TrainSliceTransform(image_size, augment),
                     seed=int(augment_seed))
  ds = ds.batch(batch_size, drop_remainder=True)
  # SciPy holds the GIL, so one prefetch thread per process suffices.
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def create_train_loader(config: ml_collections.ConfigDict, data: DataSet, *,
                        process_index: int | None = None,
                        process_count: int | None = None
                        ) -> grain.DatasetIterator:
  """Iterator over this process's training batches of `data`.

  Reads config.seed, config.batch_size (global) and config.dataset.{
  image_size, train_split, num_workers, augment}.

  Args:
    config: experiment config.
    data: the opened data set (`DataSet.open(config.dataset)`).
    process_index, process_count: default jax.process_index() and
      jax.process_count().

  Returns:
    A checkpointable grain iterator of {'image': (b, S, S, C) float32,
    'label': (b, S, S) int32}, b = config.batch_size // process_count,
    S = config.dataset.image_size. Its `get_state()` is a JSON-able dict that
    `set_state()` of a loader with the same config and process layout
    resumes from; with num_workers > 0, `close()` it when done.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible '
                     f'by the {process_count} processes.')
  dataset = train_dataset(
      data.source(config.dataset.train_split),
      batch_size=config.batch_size // process_count,
      image_size=config.dataset.image_size,
      augment=config.dataset.augment,
      seed=config.seed,
      process_index=process_index,
      process_count=process_count,
      num_workers=config.dataset.num_workers)
  return iter(dataset)


class _DevicePrefetchIterator(grain.DatasetIterator):
  """Batches of a host iterator as global jax.Arrays, transferred early.

  Each buffered batch is kept with the parent's state recorded just before
  the batch was read, so `get_state()` names the first batch not yet
  returned, however far the parent has run ahead.
  """

  def __init__(self, parent: grain.DatasetIterator, size: int,
               sharding: jax.sharding.Sharding):
    super().__init__(parent)
    self._size = size
    self._sharding = sharding
    # (parent state before the batch, the batch on the devices), oldest first.
    self._buffer = collections.deque()

  def _transfer(self, local_batch: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._sharding, x),
        local_batch)

  def __next__(self) -> Any:
    while len(self._buffer) < self._size:
      state = copy.deepcopy(self._parent.get_state())
      try:
        local_batch = next(self._parent)
      except StopIteration:
        break
      self._buffer.append((state, self._transfer(local_batch)))
    if not self._buffer:
      raise StopIteration
    return self._buffer.popleft()[1]

  def get_state(self) -> dict[str, Any]:
    if self._buffer:
      return copy.deepcopy(self._buffer[0][0])
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._buffer.clear()
    self._parent.set_state(state)


def prefetch_to_device(iterator: grain.DatasetIterator, size: int,
                       sharding: jax.sharding.Sharding
                       ) -> grain.DatasetIterator:
  """Puts the batches of `iterator` on the devices `size` - 1 batches ahead.

  Every leaf of a batch is this process's part of a global array split by
  `sharding` (`jax.make_array_from_process_local_data`, an explicit
  transfer). Asking for a batch first tops the buffer up to `size` batches
  (reading and transferring them), then returns the oldest: with size 2,
  the next batch's transfer starts before the current batch's step is
  dispatched, while earlier steps still run; with size 1, each batch is
  transferred when asked for.

  Args:
    iterator: a grain iterator of host batches (pytrees of NumPy arrays),
      e.g. from `create_train_loader`.
    size: batches held on the devices, >= 1.
    sharding: where the global batch lives (e.g. split over the mesh axis
      'data').

  Returns:
    A grain iterator of the same batches as jax.Arrays. Its `get_state()` is
    the state of `iterator` just before the first batch not yet returned,
    so a checkpoint of it (e.g. `grain.checkpoint.CheckpointSave`) resumes
    at the batch the next step would have used; `set_state()` drops the
    prefetched batches.
  """
  if size < 1:
    raise ValueError(f'prefetch size must be >= 1, got {size}.')
  return _DevicePrefetchIterator(iterator, size, sharding)


# ----------------------------------------------------------------------------
# Whole cases for evaluation.


def _case_slices(data: DataSet,
                 split: str) -> dict[str, list[tuple[int, int]]]:
  """case_id -> sorted [(slice_index, record index)] of a split."""
  skip = tfds.decode.SkipDecoding()
  index_source = data.source(split, decoders={'image': skip, 'label': skip})
  slices = {}
  for start in range(0, len(index_source), _INDEX_CHUNK):
    indices = range(start, min(start + _INDEX_CHUNK, len(index_source)))
    for index, record in zip(indices, index_source.__getitems__(indices)):
      case_id = record['case_id']
      if isinstance(case_id, bytes):
        case_id = case_id.decode()
      slices.setdefault(case_id, []).append(
          (int(record['slice_index']), index))
  for case_id, entries in slices.items():
    entries.sort()
    slice_indices = [slice_index for slice_index, _ in entries]
    if len(set(slice_indices)) != len(slice_indices):
      raise ValueError(f'{data.directory}: split {split!r} holds case '
                       f'{case_id!r} with repeated slice indices.')
  return slices


def iterate_cases(data: DataSet, split: str) -> Iterator[Case]:
  """Yields the cases of `split`, sorted by case_id, at native resolution.

  Slices are stacked in slice_index order; 2D data sets give D = 1.
  """
  source = data.source(split)
  for case_id, entries in sorted(_case_slices(data, split).items()):
    records = source.__getitems__([index for _, index in entries])
    shapes = {r['label'].shape for r in records}
    if len(shapes) != 1:
      raise ValueError(f'{data.directory}: slices of case {case_id!r} in '
                       f'split {split!r} differ in shape: {sorted(shapes)}.')
    yield Case(
        case_id=case_id,
        image=np.stack([to_float_image(r['image']) for r in records]),
        label=np.stack([r['label'] for r in records]),
        spacing=tuple(float(s) for s in records[0]['spacing']))
