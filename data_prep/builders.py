"""TFDS builders that store every data set as 2D slices in ArrayRecord files.

One builder per data set, all sharing `SourceBuilder`, which takes its
metadata and examples from a source module (`data_prep.sources`). The source
module is imported only when a builder is used, so an unfinished reader does
not break the others.

On-disk format (native resolution, one record per 2D slice, records of a
split stored in generation order, i.e. slice by slice, case by case):

  image        Tensor (H, W, C), float32 (CT/MRI scaled to [0, 1]) or uint8
               (RGB), raw bytes
  label        Tensor (H, W) uint8 class ids, zlib-compressed
  case_id      Text
  slice_index  int32 scalar, position of the slice in its case (0 for 2D)
  spacing      Tensor (3,) float32, (z, y, x) in mm; (1, 1, 1) if unknown

The dataset metadata (`metadata.json`) records the source name, the number
of classes and channels, the class names (background first; empty where the
source names none), whether cases are volumes, the layout of the source
folder, the splits written, and every build option the build applied
(defaults included; options the layout does not use are refused when given
and not recorded), so a built data set says how it was made. A build that
holds nothing out for validation (e.g. val_cases=0) writes no 'validation'
split: `builder.info.splits` lacks it and metadata.json's `splits` says so.

Writing needs no TensorFlow: TFDS serialises `Tensor`/`Text` features and
writes ArrayRecord with NumPy and protobuf only.
"""

import pathlib
import types
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from data_prep import sources

DATASET_VERSION = '1.0.0'


def features_for(source: types.ModuleType) -> tfds.features.FeaturesDict:
  """The feature spec of a slice of `source`."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(
          shape=(None, None, source.IN_CHANNELS),
          dtype=np.dtype(source.IMAGE_DTYPE),
          encoding=tfds.features.Encoding.BYTES),
      'label': tfds.features.Tensor(
          shape=(None, None), dtype=np.uint8,
          encoding=tfds.features.Encoding.ZLIB),
      'case_id': tfds.features.Text(),
      'slice_index': tfds.features.Scalar(dtype=np.int32),
      'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
  })


def check_example(key: str, example: Mapping[str, Any],
                  source: types.ModuleType) -> None:
  """Raises ValueError if `example` breaks the source contract."""
  image, label = np.asarray(example['image']), np.asarray(example['label'])
  where = f'{source.NAME} example {key!r}'
  expected_image = (source.IN_CHANNELS, np.dtype(source.IMAGE_DTYPE))
  if (image.ndim != 3 or
      (image.shape[-1], image.dtype) != expected_image):
    raise ValueError(
        f'{where}: image has shape {image.shape} and dtype {image.dtype}; '
        f'expected (H, W, {source.IN_CHANNELS}) {expected_image[1]}.')
  if label.dtype != np.uint8 or label.shape != image.shape[:2]:
    raise ValueError(
        f'{where}: label has shape {label.shape} and dtype {label.dtype}; '
        f'expected {image.shape[:2]} uint8.')
  if label.size and label.max() >= source.NUM_CLASSES:
    raise ValueError(f'{where}: label value {label.max()} is not below '
                     f'NUM_CLASSES={source.NUM_CLASSES}.')


class SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds a data set from the source module named `SOURCE`.

  Build options are the keyword options of the source's `generate_examples`;
  the manual download folder (TFDS's `manual_dir`) is the source folder.

  Attributes:
    source: the source module.
    plan: its `sources.BuildPlan` for the source folder and options.
    options: the options the build applies (given or default).
  """

  SOURCE: ClassVar[str]
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {
      DATASET_VERSION: 'Native-resolution 2D examples (slices of volumes, '
                       'or images) in ArrayRecord.'}

  def __init__(self, *, src: pathlib.Path | None = None,
               options: Mapping[str, Any] | None = None, **kwargs):
    """Args: src: the source folder (checked to exist; None when the source
    needs none); options: the build options given; kwargs: TFDS's."""
    self.source = sources.load_source(self.SOURCE)
    self.plan, self.options = sources.plan_build(self.source, src,
                                                 options or {})
    self.MANUAL_DOWNLOAD_INSTRUCTIONS = (  # pylint: disable=invalid-name
        self.source.MANUAL_DOWNLOAD_INSTRUCTIONS or None)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.source.__doc__ or self.source.NAME).strip(),
        features=features_for(self.source),
        metadata=tfds.core.MetadataDict(
            source=self.source.NAME,
            num_classes=self.source.NUM_CLASSES,
            in_channels=self.source.IN_CHANNELS,
            is_volumetric=self.source.IS_VOLUMETRIC,
            class_names=list(getattr(self.source, 'CLASS_NAMES', ())),
            layout=self.plan.layout,
            splits=list(self.plan.splits),
            options=self.options),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    src = None
    if sources.needs_source_folder(self.source):
      src = pathlib.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(src, split)
            for split in self.plan.splits}

  def _generate_examples(self, src: pathlib.Path | None,
                         split: str) -> Iterator[tuple[str, dict]]:
    count = 0
    for count, (key, example) in enumerate(
        self.source.generate_examples(src, split, **self.options), start=1):
      check_example(key, example, self.source)
      yield key, example
    if not count:
      raise ValueError(
          f'{src or self.source.NAME}: the {split!r} split of '
          f'{self.source.NAME} holds no examples (build options '
          f'{self.options}).')


class SelfregDemo(SourceBuilder):
  """Synthetic phantom volumes (no download)."""
  SOURCE = 'demo'


class SelfregSynapse(SourceBuilder):
  """Synapse multi-organ abdominal CT (BTCV), 9 classes."""
  SOURCE = 'synapse'


class SelfregAcdc(SourceBuilder):
  """ACDC cardiac cine MRI, 4 classes."""
  SOURCE = 'acdc'


class SelfregGlas(SourceBuilder):
  """GlaS gland segmentation in colon histology, binary."""
  SOURCE = 'glas'


class SelfregMonuseg(SourceBuilder):
  """MoNuSeg nuclei segmentation in H&E histology, binary."""
  SOURCE = 'monuseg'


# Short data set name (as in `data_prep.sources`) -> builder class.
BUILDERS: dict[str, type[SourceBuilder]] = {
    b.SOURCE: b for b in (SelfregDemo, SelfregSynapse, SelfregAcdc,
                          SelfregGlas, SelfregMonuseg)
}


def builder_class(name: str) -> type[SourceBuilder]:
  """The builder of data set `name` ('demo', 'synapse', ...)."""
  if name not in BUILDERS:
    raise ValueError(
        f'Unknown data set {name!r}; valid names: {", ".join(BUILDERS)}.')
  return BUILDERS[name]
