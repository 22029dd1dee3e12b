"""Tests of the grain input pipeline on a tiny built demo set."""

import json

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scipy import ndimage

from data_prep import build
from data_prep import demo
from selfreg_jax.core import input_pipeline
from selfreg_jax.core import sharding

# Tiny demo set with square slices of SLICE_SIZE px (so an image_size of
# SLICE_SIZE leaves slices untouched) and cases of varying depth.
SLICE_SIZE = 24
TINY_OPTIONS = dict(num_train_cases=3, num_validation_cases=1,
                    num_test_cases=2, min_slices=3, max_slices=5,
                    min_size=SLICE_SIZE, max_size=SLICE_SIZE, seed=5)
BATCH_SIZE = 4
IMAGE_SIZE = 16
NUM_BATCHES = 3


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  build.build_dataset('demo', data_dir=data_dir, **TINY_OPTIONS)
  return data_dir


def make_config(data_dir, **dataset_overrides) -> ml_collections.ConfigDict:
  dataset = dict(name='selfreg_demo', data_dir=str(data_dir),
                 image_size=IMAGE_SIZE, train_split='train', num_workers=0,
                 augment=True, in_channels=demo.IN_CHANNELS,
                 num_classes=demo.NUM_CLASSES, volumetric=True)
  dataset.update(dataset_overrides)
  return ml_collections.ConfigDict(
      dict(seed=0, batch_size=BATCH_SIZE, dataset=dataset))


def train_loader(config, **kwargs):
  return input_pipeline.create_train_loader(
      config, input_pipeline.DataSet.open(config.dataset), **kwargs)


def cases_of(config, split):
  return input_pipeline.iterate_cases(
      input_pipeline.DataSet.open(config.dataset), split)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def generated_slices(split):
  return [ex for _, ex in demo.generate_examples(None, split, **TINY_OPTIONS)]


def test_batches_have_the_configured_shapes_and_dtypes(data_dir):
  batches = take(train_loader(make_config(data_dir)),
                 NUM_BATCHES)
  for batch in batches:
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE,
                                    demo.IN_CHANNELS)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE)
    assert batch['label'].dtype == np.int32
    assert 0 <= batch['label'].min() and batch['label'].max() < demo.NUM_CLASSES
    # Cubic interpolation may overshoot [0, 1] a little.
    assert -0.2 < batch['image'].min() and batch['image'].max() < 1.2


def test_same_seed_same_stream_other_seed_other_stream(data_dir):
  config = make_config(data_dir)
  first = take(train_loader(config), NUM_BATCHES)
  again = take(train_loader(config), NUM_BATCHES)
  assert_batches_equal(first, again)
  config.seed = 1
  other = take(train_loader(config), NUM_BATCHES)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_processes_read_disjoint_shards_covering_the_split(data_dir):
  # Untouched slices (no augmentation, native size) identify their records.
  config = make_config(data_dir, augment=False, image_size=SLICE_SIZE)
  all_slices = {ex['image'].tobytes() for ex in generated_slices('train')}
  process_count = 2
  epochs = {}
  for process_index in range(process_count):
    loader = train_loader(
        config, process_index=process_index, process_count=process_count)
    shard_size = len(range(process_index, len(all_slices), process_count))
    local_batch = BATCH_SIZE // process_count
    num_batches = -(-2 * shard_size // local_batch)  # Two epochs, rounded up.
    images = np.concatenate([b['image'] for b in take(loader, num_batches)])
    first_epoch = [x.tobytes() for x in images[:shard_size]]
    second_epoch = [x.tobytes() for x in images[shard_size:2 * shard_size]]
    assert len(set(first_epoch)) == shard_size
    assert set(second_epoch) == set(first_epoch)
    assert second_epoch != first_epoch  # Reshuffled each epoch.
    epochs[process_index] = set(first_epoch)
  assert not epochs[0] & epochs[1]
  assert epochs[0] | epochs[1] == all_slices


def test_resume_from_saved_state_continues_exactly(data_dir):
  config = make_config(data_dir)
  loader = train_loader(config)
  take(loader, NUM_BATCHES)
  state = json.loads(json.dumps(loader.get_state()))
  expected = take(loader, NUM_BATCHES)
  resumed = train_loader(config)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, NUM_BATCHES), expected)


def save_read_restore(iterator, fresh_iterator, tmp_path):
  """Saves `iterator` with orbax, reads NUM_BATCHES more from it, then
  restores the checkpoint into `fresh_iterator`: (restored, batches read)."""
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(NUM_BATCHES, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = take(iterator, NUM_BATCHES)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    restored = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(fresh_iterator)))
  return restored.data, expected


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(
    data_dir, tmp_path):
  config = make_config(data_dir)
  loader = train_loader(config)
  take(loader, NUM_BATCHES)
  restored, expected = save_read_restore(
      loader, train_loader(config), tmp_path)
  assert_batches_equal(take(restored, NUM_BATCHES), expected)


def test_worker_processes_give_the_same_stream_and_resume(data_dir):
  in_process = take(
      train_loader(make_config(data_dir)),
      2 * NUM_BATCHES)
  config = make_config(data_dir, num_workers=1)
  loader = train_loader(config)
  try:
    assert_batches_equal(take(loader, NUM_BATCHES), in_process[:NUM_BATCHES])
    state = loader.get_state()
  finally:
    loader.close()
  resumed = train_loader(config)
  try:
    resumed.set_state(state)
    assert_batches_equal(take(resumed, NUM_BATCHES), in_process[NUM_BATCHES:])
  finally:
    resumed.close()


def _batch_sharding():
  return sharding.batch_sharding(sharding.data_mesh())


def test_prefetch_to_device_gives_the_batches_as_sharded_arrays(data_dir):
  config = make_config(data_dir)
  expected = take(train_loader(config), NUM_BATCHES)
  sharding = _batch_sharding()
  prefetched = take(input_pipeline.prefetch_to_device(
      train_loader(config), 2, sharding), NUM_BATCHES)
  for batch in prefetched:
    for array in batch.values():
      assert isinstance(array, jax.Array) and array.sharding == sharding
  assert_batches_equal(jax.device_get(prefetched), expected)


@pytest.mark.parametrize('size', [1, NUM_BATCHES])
def test_prefetched_iterator_checkpoint_resumes_at_the_first_unused_batch(
    data_dir, tmp_path, size):
  config = make_config(data_dir)
  loader = train_loader(config)
  prefetched = input_pipeline.prefetch_to_device(loader, size,
                                                 _batch_sharding())
  take(prefetched, NUM_BATCHES)
  # The loader has read size - 1 batches that no caller has seen yet.
  assert (loader.get_state() == prefetched.get_state()) == (size == 1)
  restored, expected = save_read_restore(
      prefetched, input_pipeline.prefetch_to_device(
          train_loader(config), size,
          _batch_sharding()), tmp_path)
  assert_batches_equal(jax.device_get(take(restored, NUM_BATCHES)),
                       jax.device_get(expected))


def test_prefetch_to_device_ends_with_its_iterator():
  count = 5
  finite = iter(grain.MapDataset.range(count).map(
      lambda i: {'x': np.full((2,), i)}).to_iter_dataset())
  batches = list(input_pipeline.prefetch_to_device(finite, 2,
                                                   _batch_sharding()))
  assert [int(b['x'][0]) for b in batches] == list(range(count))


def test_prefetch_to_device_needs_a_positive_size(data_dir):
  with pytest.raises(ValueError, match='prefetch size must be >= 1, got 0'):
    input_pipeline.prefetch_to_device(
        train_loader(make_config(data_dir)), 0,
        _batch_sharding())


def _blob_records(num_records, height, width, threshold, rgb):
  """Records of smooth blobs whose label is `first channel > threshold`."""
  rng = np.random.default_rng(0)
  records = []
  for _ in range(num_records):
    blobs = ndimage.gaussian_filter(rng.standard_normal((height, width)), 3)
    blobs = (blobs - blobs.min()) / (blobs.max() - blobs.min())
    if rgb:
      image = np.stack([blobs, blobs**2, 1 - blobs], -1)
      image = np.round(image * 255).astype(np.uint8)
      label = (image[..., 0] > threshold * 255).astype(np.uint8)
    else:
      image = blobs[..., None].astype(np.float32)
      label = (image[..., 0] > threshold).astype(np.uint8)
    records.append({'image': image, 'label': label})
  return records


def _augmented(records, image_size, augment=True):
  dataset = input_pipeline.train_dataset(
      records, batch_size=len(records), image_size=image_size,
      augment=augment, seed=0)
  return next(iter(dataset))


@pytest.mark.parametrize('rgb', [False, True])
def test_augmentation_keeps_image_and_label_aligned(rgb):
  threshold, size, count = 0.5, 20, 16
  records = _blob_records(count, size, size, threshold, rgb)
  batch = _augmented(records, image_size=size)
  assert batch['image'].dtype == np.float32
  assert batch['image'].shape == (count, size, size, 3 if rgb else 1)
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1
  # Without resizing, rot90/flip and nearest-neighbour rotation are exact.
  np.testing.assert_array_equal(batch['label'],
                                batch['image'][..., 0] > threshold)
  if rgb:  # Channels move together.
    np.testing.assert_allclose(batch['image'][..., 1],
                               np.round(batch['image'][..., 0]**2 * 255) / 255,
                               atol=2 / 255)
  # The augmentation did move most slices.
  plain = _augmented(records, image_size=size, augment=False)
  moved = [not np.array_equal(a, b)
           for a, b in zip(batch['label'], plain['label'])]
  assert sum(moved) >= count // 2


def test_augmentation_and_resize_stay_aligned_up_to_edges():
  threshold, count, size = 0.5, 16, 24
  records = _blob_records(count, 40, 30, threshold, rgb=False)
  batch = _augmented(records, image_size=size)
  assert batch['image'].shape == (count, size, size, 1)
  disagreement = np.mean(batch['label'] != (batch['image'][..., 0] > threshold))
  # Misaligning the labels would disagree on a large part of the slices.
  misaligned = np.mean(np.flip(batch['label'], 1) !=
                       (batch['image'][..., 0] > threshold))
  assert disagreement < 0.03 < 0.2 < misaligned


@pytest.mark.parametrize('split', ['train', 'test'])
def test_iterate_cases_rebuilds_the_generated_volumes(data_dir, split):
  cases = list(cases_of(make_config(data_dir), split))
  expected = {}
  for ex in generated_slices(split):
    expected.setdefault(ex['case_id'], []).append(ex)
  assert [c.case_id for c in cases] == sorted(expected)
  for case in cases:
    slices = expected[case.case_id]
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    np.testing.assert_array_equal(
        case.image, np.stack([ex['image'] for ex in slices]))
    np.testing.assert_array_equal(
        case.label, np.stack([ex['label'] for ex in slices]))
    np.testing.assert_allclose(case.spacing, slices[0]['spacing'])


def test_missing_data_set_names_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match='python -m data_prep.build demo --out'):
    train_loader(make_config(tmp_path))


def test_config_mismatches_are_reported(data_dir):
  with pytest.raises(ValueError, match="'num_classes': 5.*'num_classes': 9"):
    train_loader(make_config(data_dir, num_classes=9))
  with pytest.raises(ValueError, match='not divisible'):
    train_loader(make_config(data_dir),
                                       process_index=0, process_count=3)
  with pytest.raises(ValueError, match="no split 'nonesuch'"):
    list(cases_of(make_config(data_dir), 'nonesuch'))
