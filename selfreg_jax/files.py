"""Writing result files whole, with the permissions the user's umask gives."""

import os
import pathlib
import secrets


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it.

  Readers see the old file or the new one, never half of it. The file gets
  the mode a plain `open(path, 'w')` would give it, 0o666 less the umask
  (`tempfile.mkstemp` would leave it 0o600, unreadable to the user's group).
  Missing parent folders are created.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f'.{path.name}.{secrets.token_hex(8)}.tmp')
  handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(handle, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise
