"""Tests for selfreg_jax.interop.torch_io on torch.save-format files written here.

torch is not installed: `_write_torch_zip` mimics torch.save (torch >= 1.6).
A pure-Python pickler emits the same GLOBAL opcodes torch does
(torch._utils._rebuild_tensor_v2, torch.FloatStorage, ...) and persistent ids
('storage', StorageType, key, 'cpu', numel), and the raw little-endian storage
bytes go to <prefix>/data/<key> in an uncompressed zip.
"""

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np
import pytest

from selfreg_jax.interop import torch_io

ROWS, COLS = 4, 6
SEED = 0
# Elements of the storage that the tensor-budget test views many times, and
# of the zeros that the .npz bomb deflates about 1000-fold.
VIEWED_STORAGE = 2**10
BOMB_ELEMENTS = 2**18


@dataclasses.dataclass(frozen=True)
class TorchGlobal:
  """A global named by module and name, pickled without importing it."""
  module: str
  name: str

  def __call__(self, *args):
    raise AssertionError('a stand-in global is only pickled, never called')


@dataclasses.dataclass(eq=False)
class Storage:
  """A torch storage stand-in: `data` is the flat storage, `kind` its class."""
  key: str
  kind: str
  data: np.ndarray


@dataclasses.dataclass(eq=False)
class Tensor:
  """A strided view of a Storage (offset, size and stride in elements)."""
  storage: Storage
  offset: int
  size: Tuple[int, ...]
  stride: Tuple[int, ...]


@dataclasses.dataclass(eq=False)
class Parameter:
  tensor: Tensor


@dataclasses.dataclass(eq=False)
class Call:
  """Pickles as a call of `function` on `args` (REDUCE), like an exploit."""
  function: TorchGlobal
  args: Tuple[Any, ...]


REBUILD_TENSOR = TorchGlobal('torch._utils', '_rebuild_tensor_v2')
REBUILD_PARAMETER = TorchGlobal('torch._utils', '_rebuild_parameter')
STORAGE_KINDS = {
    np.dtype(np.float32): 'FloatStorage',
    np.dtype(np.float64): 'DoubleStorage',
    np.dtype(np.float16): 'HalfStorage',
    np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
    np.dtype(np.int64): 'LongStorage',
    np.dtype(np.int32): 'IntStorage',
    np.dtype(np.int16): 'ShortStorage',
    np.dtype(np.int8): 'CharStorage',
    np.dtype(np.uint8): 'ByteStorage',
    np.dtype(np.bool_): 'BoolStorage',
}


class TorchStandInPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles Storage/Tensor/Parameter/Call as torch.save's data.pkl does."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, protocol=2):
    super().__init__(file, protocol=protocol)
    self.storages: Dict[str, Storage] = {}

  def save_torch_global(self, obj: TorchGlobal):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('ascii'))
    self.memoize(obj)

  dispatch[TorchGlobal] = save_torch_global

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    self.storages[obj.key] = obj
    return ('storage', TorchGlobal('torch', obj.kind), obj.key, 'cpu',
            obj.data.size)

  def reducer_override(self, obj):
    if isinstance(obj, Tensor):
      return REBUILD_TENSOR, (obj.storage, obj.offset, obj.size, obj.stride,
                              False, collections.OrderedDict())
    if isinstance(obj, Parameter):
      return REBUILD_PARAMETER, (obj.tensor, True, collections.OrderedDict())
    if isinstance(obj, Call):
      return obj.function, obj.args
    return NotImplemented


def _storage_bytes(data: np.ndarray, byteorder: str) -> bytes:
  code = f'{"<" if byteorder == "little" else ">"}u{data.itemsize}'
  return data.view(f'u{data.itemsize}').astype(code).tobytes()


def _write_torch_zip(path: Path, obj: Any, prefix: str = 'archive',
                     byteorder: str = 'little', skip_keys=(),
                     storage_compression: int = zipfile.ZIP_STORED) -> Path:
  buffer = io.BytesIO()
  pickler = TorchStandInPickler(buffer)
  pickler.dump(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{prefix}/data.pkl', buffer.getvalue())
    archive.writestr(f'{prefix}/byteorder', byteorder)
    for key, storage in pickler.storages.items():
      if key not in skip_keys:
        archive.writestr(f'{prefix}/data/{key}',
                         _storage_bytes(storage.data, byteorder),
                         compress_type=storage_compression)
    archive.writestr(f'{prefix}/version', '3\n')
  return path


def _contiguous(array: np.ndarray, key: str) -> Tensor:
  """A contiguous Tensor over its own storage, holding `array`."""
  array = np.asarray(array, order='C')  # Keeps 0-d tensors 0-d.
  strides = tuple(s // array.itemsize for s in array.strides)
  storage = Storage(key, STORAGE_KINDS[array.dtype], array.ravel())
  return Tensor(storage, 0, array.shape, strides)


def _random(dtype, shape=(ROWS, COLS)) -> np.ndarray:
  values = np.random.default_rng(SEED).normal(size=shape) * 50
  return values.astype(dtype)


@pytest.mark.parametrize('dtype', list(STORAGE_KINDS), ids=str)
def test_dtypes_round_trip_exactly(tmp_path, dtype):
  expected = _random(dtype)
  path = _write_torch_zip(tmp_path / 'w.pth', {'w': _contiguous(expected, '0')})
  loaded = torch_io.load_checkpoint(path)['w']
  assert loaded.dtype == dtype and loaded.shape == expected.shape
  np.testing.assert_array_equal(loaded.view(np.uint8), expected.view(np.uint8))


def test_views_share_one_storage_read_once(tmp_path, monkeypatch):
  base = np.arange(ROWS * COLS, dtype=np.float32)
  storage = Storage('0', 'FloatStorage', base)
  matrix = base.reshape(ROWS, COLS)
  checkpoint = {
      'matrix': Tensor(storage, 0, (ROWS, COLS), (COLS, 1)),
      'transposed': Tensor(storage, 0, (COLS, ROWS), (1, COLS)),
      'rows_1_2': Tensor(storage, COLS, (2, COLS), (COLS, 1)),
      'column_3': Tensor(storage, 3, (ROWS,), (COLS,)),
      'every_other': Tensor(storage, 1, (ROWS, COLS // 2), (COLS, 2)),
      'scalar': Tensor(storage, 5, (), ()),
      'empty': Tensor(storage, 0, (0, COLS), (COLS, 1)),
  }
  path = _write_torch_zip(tmp_path / 'views.pt', checkpoint)
  reads = []
  read = zipfile.ZipFile.read
  monkeypatch.setattr(zipfile.ZipFile, 'read',
                      lambda self, name, *a: reads.append(name) or
                      read(self, name, *a))
  loaded = torch_io.load_checkpoint(path)
  assert reads.count('archive/data/0') == 1
  expected = {'matrix': matrix, 'transposed': matrix.T,
              'rows_1_2': matrix[1:3], 'column_3': matrix[:, 3],
              'every_other': matrix[:, 1::2], 'scalar': base[5],
              'empty': matrix[:0]}
  for name, value in expected.items():
    assert loaded[name].shape == value.shape, name
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable


def test_nested_model_dict_with_parameter_and_plain_leaves(tmp_path):
  weight, bias = _random(np.float32), _random(np.float32, (COLS,))
  model = collections.OrderedDict([
      ('module.linear.weight', Parameter(_contiguous(weight, 'w'))),
      ('module.linear.bias', _contiguous(bias, 'b')),
  ])
  model._metadata = collections.OrderedDict([('', {'version': 1})])  # As torch.
  checkpoint = {'model': model, 'epoch': 7, 'lr': 0.5, 'arch': 'swin',
                'best': None, 'milestones': [1, 2], 'size': (ROWS, COLS)}
  loaded = torch_io.load_checkpoint(
      _write_torch_zip(tmp_path / 'ckpt.bin', checkpoint, prefix='ckpt'))
  assert type(loaded['model']) is collections.OrderedDict
  assert list(loaded['model']) == list(model)
  assert loaded['model']._metadata == {'': {'version': 1}}
  assert {k: loaded[k] for k in ('epoch', 'lr', 'arch', 'best', 'milestones',
                                 'size')} == {
      'epoch': 7, 'lr': 0.5, 'arch': 'swin', 'best': None,
      'milestones': [1, 2], 'size': (ROWS, COLS)}
  state_dict = torch_io.state_dict_of(loaded)
  assert list(state_dict) == ['linear.weight', 'linear.bias']
  np.testing.assert_array_equal(state_dict['linear.weight'], weight)
  np.testing.assert_array_equal(state_dict['linear.bias'], bias)


def test_state_dict_of_unwraps_state_dict_and_checks_leaves():
  weight = _random(np.float32)
  assert torch_io.state_dict_of({'state_dict': {'w': weight}})['w'] is weight
  assert list(torch_io.state_dict_of({'module.w': weight})) == ['w']
  with pytest.raises(ValueError, match="'epoch' is a int"):
    torch_io.state_dict_of({'w': weight, 'epoch': 3})
  with pytest.raises(ValueError, match="'w' occurs with and without"):
    torch_io.state_dict_of({'w': weight, 'module.w': weight})


def test_big_endian_byteorder_record(tmp_path):
  checkpoint = {dtype.name: _contiguous(_random(dtype), str(i))
                for i, dtype in enumerate(STORAGE_KINDS)}
  path = _write_torch_zip(tmp_path / 'big.pth', checkpoint, byteorder='big')
  loaded = torch_io.load_checkpoint(path)
  for dtype in STORAGE_KINDS:
    np.testing.assert_array_equal(loaded[dtype.name], _random(dtype))


MARKER = 'pwned'


@pytest.mark.parametrize('module, name, argument', [
    ('os', 'system', 'touch {marker}'),
    ('posix', 'system', 'touch {marker}'),
    ('builtins', 'eval', "open({marker!r}, 'w')"),
    ('builtins', 'exec', "open({marker!r}, 'w')"),
    ('torch.nn.modules.linear', 'Linear', 'ignored'),
])
def test_refuses_any_other_global_without_running_it(tmp_path, module, name,
                                                     argument):
  marker = tmp_path / MARKER
  payload = Call(TorchGlobal(module, name),
                 (argument.format(marker=str(marker)),))
  path = _write_torch_zip(tmp_path / 'evil.pth',
                          {'w': _contiguous(_random(np.float32), '0'),
                           'payload': payload})
  with pytest.raises(torch_io.UnsafeCheckpointError) as error:
    torch_io.load_checkpoint(path)
  assert f'{module}.{name}' in str(error.value)
  assert str(path) in str(error.value)
  assert not marker.exists()


class _Exploit:
  """A real `os.system` payload, as pickle.dumps writes it (STACK_GLOBAL)."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_refuses_real_protocol_4_exploit(tmp_path):
  marker = tmp_path / MARKER
  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl',
                     pickle.dumps({'x': _Exploit(marker)}, protocol=4))
  with pytest.raises(torch_io.UnsafeCheckpointError, match=r'system'):
    torch_io.load_checkpoint(path)
  assert not marker.exists()


def test_view_past_its_storage_is_refused(tmp_path):
  storage = Storage('0', 'FloatStorage', np.zeros(ROWS * COLS, np.float32))
  path = _write_torch_zip(tmp_path / 'oob.pth',
                          {'w': Tensor(storage, COLS, (ROWS, COLS), (COLS, 1))})
  with pytest.raises(torch_io.CheckpointError, match='reaches past'):
    torch_io.load_checkpoint(path)


def test_view_with_more_elements_than_its_storage_is_refused(tmp_path):
  one = Storage('0', 'FloatStorage', np.ones(1, np.float32))
  path = _write_torch_zip(tmp_path / 'stride0.pth',
                          {'w': Tensor(one, 0, (ROWS, COLS), (0, 0))})
  with pytest.raises(torch_io.CheckpointError) as error:
    torch_io.load_checkpoint(path)
  assert str(path) in str(error.value)
  assert f'{ROWS * COLS} elements, more than the 1' in str(error.value)


def test_overlapping_view_as_large_as_its_storage_loads(tmp_path):
  base = np.arange(ROWS * COLS, dtype=np.float32)
  storage = Storage('0', 'FloatStorage', base)
  path = _write_torch_zip(tmp_path / 'overlap.pth',
                          {'w': Tensor(storage, 0, (ROWS, COLS), (1, 1))})
  expected = base[np.add.outer(np.arange(ROWS), np.arange(COLS))]
  np.testing.assert_array_equal(torch_io.load_checkpoint(path)['w'], expected)


def test_tensors_beyond_a_multiple_of_the_file_are_refused(tmp_path):
  storage = Storage('0', 'FloatStorage',
                    np.zeros(VIEWED_STORAGE, np.float32))

  def views(count):
    return {str(i): Tensor(storage, 0, (VIEWED_STORAGE,), (1,))
            for i in range(count)}

  tied = _write_torch_zip(tmp_path / 'tied.pth', views(2))
  assert len(torch_io.load_checkpoint(tied)) == 2
  # Each view copies the storage, which dwarfs the rest of the file.
  limit = torch_io._TENSOR_BYTES_PER_FILE_BYTE  # pylint: disable=protected-access
  copies = 2 * limit
  path = _write_torch_zip(tmp_path / 'copies.pth', views(copies))
  with pytest.raises(torch_io.CheckpointError,
                     match=r'copies\.pth: its tensors hold over'):
    torch_io.load_checkpoint(path)


def test_compressed_record_is_refused(tmp_path):
  path = _write_torch_zip(tmp_path / 'deflated.pth',
                          {'w': _contiguous(_random(np.float32), '0')},
                          storage_compression=zipfile.ZIP_DEFLATED)
  with pytest.raises(torch_io.CheckpointError,
                     match=r"deflated\.pth: record 'archive/data/0' is "
                     'compressed'):
    torch_io.load_checkpoint(path)


def test_missing_storage_record(tmp_path):
  path = _write_torch_zip(tmp_path / 'w.pth',
                          {'w': _contiguous(_random(np.float32), '0')},
                          skip_keys=('0',))
  with pytest.raises(torch_io.CheckpointError,
                     match=r"w\.pth: missing record 'archive/data/0'"):
    torch_io.load_checkpoint(path)


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / 'other.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('readme.txt', 'not a checkpoint')
  with pytest.raises(torch_io.CheckpointError, match='data.pkl'):
    torch_io.load_checkpoint(path)


def test_legacy_format_is_explained(tmp_path):
  path = tmp_path / 'legacy.pth'
  legacy_magic_number = 0x1950a86a20f9469cfc6c
  path.write_bytes(pickle.dumps(legacy_magic_number, protocol=2))
  with pytest.raises(torch_io.CheckpointError) as error:
    torch_io.load_checkpoint(path)
  assert 'legacy (pre-1.6) torch.save format' in str(error.value)
  assert '_use_new_zipfile_serialization=True' in str(error.value)
  assert str(path) in str(error.value)


def test_truncated_and_garbage_files(tmp_path):
  path = _write_torch_zip(tmp_path / 'cut.pth',
                          {'w': _contiguous(_random(np.float32), '0')})
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(torch_io.CheckpointError,
                     match=r'cut\.pth: truncated or corrupt zip'):
    torch_io.load_checkpoint(path)
  garbage = tmp_path / 'garbage.pt'
  garbage.write_bytes(b'\x00' * COLS)
  with pytest.raises(torch_io.CheckpointError, match='not a torch.save zip'):
    torch_io.load_checkpoint(garbage)


def test_safetensors_round_trip_is_atomic(tmp_path, umask):
  state_dict = {dtype.name: _random(dtype) for dtype in STORAGE_KINDS}
  state_dict['transposed'] = _random(np.float32).T
  # 0-d, like BatchNorm's num_batches_tracked.
  state_dict['scalar'] = np.array(ROWS * COLS, np.int64)
  path = tmp_path / 'w.safetensors'
  path.write_bytes(b'old contents')
  torch_io.save_safetensors(state_dict, path)
  assert os.listdir(tmp_path) == ['w.safetensors']
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask
  loaded = torch_io.load_checkpoint(path)
  assert sorted(loaded) == sorted(state_dict)
  for name, value in state_dict.items():
    assert loaded[name].dtype == value.dtype, name
    assert loaded[name].shape == value.shape, name
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_corrupt_safetensors(tmp_path):
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(b'\x00' * COLS)
  with pytest.raises(torch_io.CheckpointError, match=r'bad\.safetensors'):
    torch_io.load_checkpoint(path)


def test_npz(tmp_path):
  state_dict = {'a': _random(np.float32), 'b': _random(np.int64, (COLS,))}
  np.savez(tmp_path / 'w.npz', **state_dict)
  loaded = torch_io.load_checkpoint(tmp_path / 'w.npz')
  assert sorted(loaded) == ['a', 'b']
  for name, value in state_dict.items():
    np.testing.assert_array_equal(loaded[name], value)
  np.savez(tmp_path / 'objects.npz', a=np.array([{'x': 1}], dtype=object))
  with pytest.raises(torch_io.CheckpointError, match=r'objects\.npz'):
    torch_io.load_checkpoint(tmp_path / 'objects.npz')


def test_compressed_npz(tmp_path):
  state_dict = {'a': _random(np.float32), 'b': _random(np.int64, (COLS,)).T}
  np.savez_compressed(tmp_path / 'w.npz', **state_dict)
  loaded = torch_io.read_npz(tmp_path / 'w.npz')
  assert sorted(loaded) == ['a', 'b']
  for name, value in state_dict.items():
    np.testing.assert_array_equal(loaded[name], value)


def _write_npy_member(path: Path, shape: Tuple[int, ...], data: bytes,
                      compression: int) -> Path:
  """An .npz holding one float32 array 'x' whose header claims `shape`."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {'descr': '<f4', 'fortran_order': False, 'shape': shape})
  with zipfile.ZipFile(path, 'w', compression) as archive:
    archive.writestr('x.npy', header.getvalue() + data)
  return path


def _forbid_array_reads(monkeypatch):
  def read_array(*unused_args, **unused_kwargs):
    raise AssertionError('an array was read before the refusal')
  monkeypatch.setattr(np.lib.format, 'read_array', read_array)


def test_npz_deflate_bomb_is_refused_before_reading(tmp_path, monkeypatch):
  zeros = bytes(BOMB_ELEMENTS * 4)
  path = _write_npy_member(tmp_path / 'bomb.npz', (BOMB_ELEMENTS,), zeros,
                           zipfile.ZIP_DEFLATED)
  assert path.stat().st_size * 100 < len(zeros)
  _forbid_array_reads(monkeypatch)
  with pytest.raises(torch_io.CheckpointError,
                     match=r'bomb\.npz: its members unpack to .* more than '
                     r'100 x the file'):
    torch_io.load_checkpoint(path)


def test_npz_header_claiming_a_huge_shape_is_refused(tmp_path, monkeypatch):
  four_tib = (2**40,)  # float32 elements.
  path = _write_npy_member(tmp_path / 'claims.npz', four_tib, b'',
                           zipfile.ZIP_STORED)
  _forbid_array_reads(monkeypatch)
  with pytest.raises(torch_io.CheckpointError,
                     match=rf"claims\.npz: array 'x' claims {2**42} bytes in "
                     'its header but holds 0'):
    torch_io.load_checkpoint(path)


def test_safetensors_header_claiming_a_huge_shape_is_refused(tmp_path):
  header = json.dumps({'w': {'dtype': 'F32', 'shape': [2**40],
                             'data_offsets': [0, 4]}}).encode()
  path = tmp_path / 'claims.safetensors'
  path.write_bytes(struct.pack('<Q', len(header)) + header + bytes(4))
  with pytest.raises(torch_io.CheckpointError, match=r'claims\.safetensors'):
    torch_io.load_checkpoint(path)


def test_unknown_suffix_and_missing_file(tmp_path):
  path = tmp_path / 'w.ckpt'
  path.write_bytes(b'')
  with pytest.raises(torch_io.CheckpointError, match=r"w\.ckpt.*'\.ckpt'"):
    torch_io.load_checkpoint(path)
  with pytest.raises(FileNotFoundError, match='absent.pth'):
    torch_io.load_checkpoint(tmp_path / 'absent.pth')
