"""Reads PyTorch, safetensors and npz checkpoints into NumPy, without torch.

PyTorch's `torch.save` (torch >= 1.6) writes a zip archive whose records all
sit under one top-level folder (`archive/` in recent releases):

  archive/data.pkl      the pickled object; each tensor storage is a
                        persistent id ('storage', StorageType, key, location,
                        numel) and each tensor a call to
                        torch._utils._rebuild_tensor_v2(storage, offset, size,
                        stride, requires_grad, backward_hooks[, metadata]).
  archive/data/<key>    the raw bytes of one storage (numel elements).
  archive/byteorder     optional, 'little' (default) or 'big'.
  archive/version       the serialisation format version.

`data.pkl` is unpickled by a restricted unpickler that resolves only the tensor
rebuild functions, the storage types and `collections.OrderedDict`; any other
global is refused before it is looked up, so a checkpoint cannot run code.
Tensors come back as NumPy arrays (bfloat16 as `ml_dtypes.bfloat16`), Parameters
as their data; every other leaf is kept as pickled.
"""

import collections
import io
import os
import pickle
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Sequence, Union

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from selfreg_jax import cli

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, np.ndarray]

_TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
_SUPPORTED_SUFFIXES = _TORCH_SUFFIXES + ('.safetensors', '.npz')
_LEGACY_HINT = ('legacy (pre-1.6) torch.save format: re-save with '
                'torch.save(..., _use_new_zipfile_serialization=True)')

# Storage classes a checkpoint may name, with the element type of their bytes.
_STORAGE_DTYPES = {
    'torch.FloatStorage': np.dtype(np.float32),
    'torch.DoubleStorage': np.dtype(np.float64),
    'torch.HalfStorage': np.dtype(np.float16),
    'torch.BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'torch.LongStorage': np.dtype(np.int64),
    'torch.IntStorage': np.dtype(np.int32),
    'torch.ShortStorage': np.dtype(np.int16),
    'torch.CharStorage': np.dtype(np.int8),
    'torch.ByteStorage': np.dtype(np.uint8),
    'torch.BoolStorage': np.dtype(np.bool_),
    'torch.UntypedStorage': np.dtype(np.uint8),
    'torch.storage.UntypedStorage': np.dtype(np.uint8),
}
_REBUILD_TENSOR = 'torch._utils._rebuild_tensor_v2'
_REBUILD_PARAMETER = ('torch._utils._rebuild_parameter',
                      'torch._utils._rebuild_parameter_with_state')


class CheckpointError(cli.UserError):
  """A checkpoint file is unreadable, malformed or of an unsupported kind."""


class UnsafeCheckpointError(CheckpointError):
  """A pickled checkpoint names a global outside the tensor allow-list."""


class _StorageType(NamedTuple):
  """What a storage class global such as `torch.FloatStorage` unpickles to."""
  name: str
  dtype: np.dtype


def _rebuild_parameter(data: np.ndarray, *unused_grad_hooks_state):
  """A `torch.nn.Parameter` unpickles to its data."""
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip archive into NumPy arrays."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path):
    data_pkl = _read_record(archive, prefix + 'data.pkl', path)
    super().__init__(io.BytesIO(data_pkl))
    self._archive, self._prefix, self._path = archive, prefix, path
    byteorder = (_read_record(archive, prefix + 'byteorder', path)
                 .decode('ascii', 'replace').strip()
                 if prefix + 'byteorder' in archive.namelist() else 'little')
    if byteorder not in ('little', 'big'):
      raise CheckpointError(f'{path}: unknown byteorder record {byteorder!r}')
    self._byteorder = byteorder
    self._storages: Dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    qualname = f'{module}.{name}'
    if qualname in _STORAGE_DTYPES:
      return _StorageType(qualname, _STORAGE_DTYPES[qualname])
    if qualname == _REBUILD_TENSOR:
      return self._rebuild_tensor
    if qualname in _REBUILD_PARAMETER:
      return _rebuild_parameter
    if qualname == 'collections.OrderedDict':
      return collections.OrderedDict
    raise UnsafeCheckpointError(
        f'{self._path}: refusing to load global {qualname!r}: only tensors, '
        'storages and plain containers may appear in a checkpoint')

  def persistent_load(self, pid: Any) -> np.ndarray:
    """Returns the flat storage array that persistent id `pid` names."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int)):
      raise CheckpointError(f'{self._path}: unsupported persistent id {pid!r}')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      record = f'{self._prefix}data/{key}'
      raw = _read_record(self._archive, record, self._path)
      dtype = storage_type.dtype
      if len(raw) != numel * dtype.itemsize:
        raise CheckpointError(
            f'{self._path}: record {record!r} holds {len(raw)} bytes, expected '
            f'{numel} x {dtype.itemsize} for {storage_type.name}')
      self._storages[key] = _decode(raw, dtype, self._byteorder)
    storage = self._storages[key]
    if storage.dtype != storage_type.dtype:
      raise CheckpointError(f'{self._path}: storage {key!r} is read both as '
                            f'{storage.dtype} and as {storage_type.dtype}')
    return storage

  def _rebuild_tensor(self, storage: np.ndarray, offset: int,
                      size: Sequence[int], stride: Sequence[int],
                      *unused_grad_hooks_metadata) -> np.ndarray:
    """Copies the view (offset, size, stride in elements) out of `storage`."""
    size, stride = tuple(size), tuple(stride)
    numbers = (offset,) + size + stride
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1
            and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in numbers)):
      raise CheckpointError(f'{self._path}: malformed tensor (offset={offset}, '
                            f'size={size}, stride={stride})')
    if 0 in size:
      return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
      raise CheckpointError(
          f'{self._path}: tensor (offset={offset}, size={size}, '
          f'stride={stride}) reaches past its storage of {storage.size}')
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size,
        strides=[s * storage.itemsize for s in stride], writeable=False)
    return np.array(view, order='C')


def _decode(raw: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
  """Reads `raw` as a flat array of `dtype` stored in `byteorder`."""
  code = f'{"<" if byteorder == "little" else ">"}u{dtype.itemsize}'
  words = np.frombuffer(raw, code)
  if byteorder != sys.byteorder:
    words = words.astype(words.dtype.newbyteorder())
  return words.view(dtype)


def _read_record(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
  """Returns the bytes of zip member `name`."""
  try:
    return archive.read(name)
  except KeyError:
    raise CheckpointError(f'{path}: missing record {name!r}') from None
  except (zipfile.BadZipFile, EOFError, zlib.error) as e:
    raise CheckpointError(f'{path}: corrupt record {name!r}: {e}') from e


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
  """Returns the top-level folder ('archive/') that holds data.pkl."""
  prefixes = [n[:-len('data.pkl')] for n in archive.namelist()
              if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(prefixes) != 1:
    raise CheckpointError(f'{path}: not a torch.save zip archive: expected one '
                          f'<archive>/data.pkl, found {prefixes}')
  return prefixes[0]


def _load_torch(path: Path) -> Any:
  with open(path, 'rb') as f:
    magic = f.read(2)
  if magic[:1] == b'\x80':  # pickle PROTO opcode: the legacy format.
    raise CheckpointError(f'{path}: {_LEGACY_HINT}')
  if magic != b'PK':
    raise CheckpointError(f'{path}: not a torch.save zip archive '
                          f'(starts with {magic!r})')
  try:
    with zipfile.ZipFile(path) as archive:
      unpickler = _TorchUnpickler(archive, _archive_prefix(archive, path), path)
      return unpickler.load()
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, EOFError, zlib.error) as e:
    raise CheckpointError(f'{path}: truncated or corrupt zip: {e}') from e
  except Exception as e:  # A malformed pickle can fail in many ways.
    raise CheckpointError(
        f'{path}: malformed data.pkl: {type(e).__name__}: {e}') from e


def _load_safetensors(path: Path) -> StateDict:
  try:
    return safetensors.numpy.load_file(path)
  except safetensors.SafetensorError as e:
    raise CheckpointError(f'{path}: corrupt safetensors file: {e}') from e


def _load_npz(path: Path) -> StateDict:
  try:
    with np.load(path, allow_pickle=False) as arrays:
      return {name: arrays[name] for name in arrays.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise CheckpointError(f'{path}: unreadable npz file: {e}') from e


def load_checkpoint(path: PathLike) -> Any:
  """Loads a checkpoint as nested dicts with NumPy array leaves.

  Args:
    path: a torch.save zip archive (`.pth`, `.pt`, `.bin`), a `.safetensors`
      file or a `.npz` file.

  Returns:
    For torch files the pickled object (usually a dict, e.g. {'model':
    {name: array}}) with tensors as NumPy arrays; for safetensors and npz the
    flat {name: array} dict.

  Raises:
    FileNotFoundError: `path` does not exist.
    UnsafeCheckpointError: the pickle names a global outside the allow-list.
    CheckpointError: unknown suffix, legacy or corrupt file, missing record.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: checkpoint file not found')
  suffix = path.suffix.lower()
  if suffix in _TORCH_SUFFIXES:
    return _load_torch(path)
  if suffix == '.safetensors':
    return _load_safetensors(path)
  if suffix == '.npz':
    return _load_npz(path)
  raise CheckpointError(f'{path}: unknown checkpoint suffix {suffix!r}; '
                        f'expected one of {_SUPPORTED_SUFFIXES}')


def state_dict_of(checkpoint: Mapping[str, Any]) -> StateDict:
  """Returns the flat {name: array} state dict inside a loaded checkpoint.

  A top-level 'model' or 'state_dict' entry is unwrapped when present, and a
  leading 'module.' (from torch.nn.DataParallel) is stripped from each name.
  """
  for wrapper in ('model', 'state_dict'):
    if isinstance(checkpoint.get(wrapper), Mapping):
      checkpoint = checkpoint[wrapper]
      break
  state_dict = {}
  for name, value in checkpoint.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f'state dict entry {name!r} is a '
                       f'{type(value).__name__}, not an array')
    name = name.removeprefix('module.')
    if name in state_dict:
      raise ValueError(f'state dict name {name!r} occurs with and without '
                       "the 'module.' prefix")
    state_dict[name] = value
  return state_dict


def save_safetensors(state_dict: Mapping[str, Any], path: PathLike) -> None:
  """Writes a flat {name: array} dict to `path` atomically (temp + rename)."""
  path = Path(path)
  arrays = {}
  for name, value in state_dict.items():
    if not isinstance(name, str):
      raise ValueError(f'{path}: state dict name {name!r} is not a string')
    arrays[name] = np.ascontiguousarray(np.asarray(value))
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.',
                             suffix='.tmp')
  os.close(fd)
  try:
    safetensors.numpy.save_file(arrays, tmp)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
