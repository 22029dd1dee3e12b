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

Memory is bounded by the file's size before anything large is allocated:
torch.save stores every record uncompressed, so a compressed record is refused;
a tensor may hold no more elements than its storage record does (a stride-0
view of one element is refused), and the tensors together at most
`_TENSOR_BYTES_PER_FILE_BYTE` times the file's bytes. `.npz` files go through
`read_npz`, which bounds them the same way. Every refusal is a CheckpointError
that names the file.
"""

import collections
import io
import math
import os
import pickle
import sys
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Dict, Mapping, NamedTuple, Sequence, Union

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from selfreg_jax.common import cli
from selfreg_jax.common import files

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
# The tensors of a torch file may together hold at most this many times the
# file's bytes: each tensor is a copy, and a storage that several tensors view
# (tied weights) is copied once per tensor.
_TENSOR_BYTES_PER_FILE_BYTE = 4
# The members of an .npz file may declare at most this many times the file's
# bytes unpacked: np.savez_compressed shrinks weights and images a few times,
# a deflate bomb about 1000 times.
_NPZ_EXPANSION = 100


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
    self._tensor_bytes_allowed = (_TENSOR_BYTES_PER_FILE_BYTE *
                                  path.stat().st_size)
    self._tensor_bytes = 0

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
    """Copies the view (offset, size, stride in elements) out of `storage`.

    The view must stay inside the storage and hold no more elements than it
    (so a stride-0 expansion of a few stored values is refused), and all
    tensors together at most `_TENSOR_BYTES_PER_FILE_BYTE` x the file's bytes.
    """
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
    count = math.prod(size)
    if count > storage.size:
      raise CheckpointError(
          f'{self._path}: tensor (offset={offset}, size={size}, '
          f'stride={stride}) has {count} elements, more than the '
          f'{storage.size} its storage holds')
    self._tensor_bytes += count * storage.itemsize
    if self._tensor_bytes > self._tensor_bytes_allowed:
      raise CheckpointError(
          f'{self._path}: its tensors hold over {self._tensor_bytes_allowed} '
          f'bytes, more than {_TENSOR_BYTES_PER_FILE_BYTE} x the file\'s size')
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


def _check_unpacked_size(archive: zipfile.ZipFile, path: Path,
                         expansion: int) -> None:
  """Refuses an archive whose members unpack to over `expansion` x its bytes.

  zipfile unpacks no member past the size the archive declares for it, so this
  bounds what reading every member can allocate.
  """
  declared = sum(info.file_size for info in archive.infolist())
  size = path.stat().st_size
  if declared > expansion * size:
    raise CheckpointError(
        f'{path}: its members unpack to {declared} bytes, more than '
        f'{expansion} x the file\'s {size} bytes (a zip bomb?)')


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
      compressed = [info.filename for info in archive.infolist()
                    if info.compress_type != zipfile.ZIP_STORED]
      if compressed:
        raise CheckpointError(
            f'{path}: record {compressed[0]!r} is compressed; torch.save '
            'stores every record uncompressed (a zip bomb?)')
      _check_unpacked_size(archive, path, 1)
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


def _npy_data_bytes(member: IO[bytes], path: Path, name: str) -> int:
  """Checks the .npy header at the start of `member`; returns its data bytes.

  Raises:
    CheckpointError: an object (pickled) array.
  """
  version = np.lib.format.read_magic(member)
  # Formats 2.0 and 3.0 share one layout; 3.0 only encodes the text as UTF-8.
  read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, _, dtype = read_header(member)
  if dtype.hasobject:
    raise CheckpointError(f'{path}: array {name!r} holds Python objects, '
                          'which are never unpickled')
  return math.prod(shape) * dtype.itemsize


def read_npz(path: PathLike) -> StateDict:
  """Reads every array of an `.npz` file, refusing memory bombs first.

  Before any array is allocated: the members together may declare at most
  `_NPZ_EXPANSION` x the file's bytes unpacked (this bounds a deflate bomb),
  and each member's .npy header must claim exactly the bytes the member holds
  (so a header claiming a huge shape is refused). Object arrays are refused.

  Args:
    path: an .npz file (np.savez or np.savez_compressed).

  Returns:
    {name: array}, names without the '.npy' suffix, as np.load gives them.

  Raises:
    CheckpointError: a refusal or an unreadable file, naming the file.
  """
  path = Path(path)
  arrays = {}
  try:
    with zipfile.ZipFile(path) as archive:
      _check_unpacked_size(archive, path, _NPZ_EXPANSION)
      for info in archive.infolist():
        name = info.filename.removesuffix('.npy')
        with archive.open(info) as member:
          claimed = _npy_data_bytes(member, path, name)
          held = info.file_size - member.tell()
          if claimed != held:
            raise CheckpointError(
                f'{path}: array {name!r} claims {claimed} bytes in its header '
                f'but holds {held}')
          member.seek(0)
          arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
  except CheckpointError:
    raise
  except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
    raise CheckpointError(f'{path}: unreadable npz file: {e}') from e
  return arrays


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
    return read_npz(path)
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
  """Writes a flat {name: array} dict to `path` atomically (temp + rename).

  Shapes are kept as they are, 0-d included (BatchNorm's num_batches_tracked);
  the file gets the mode any new file gets under the process umask.
  """
  path = Path(path)
  arrays = {}
  for name, value in state_dict.items():
    if not isinstance(name, str):
      raise ValueError(f'{path}: state dict name {name!r} is not a string')
    arrays[name] = np.asarray(value, order='C')
  files.write_atomic(path, safetensors.numpy.save(arrays))
