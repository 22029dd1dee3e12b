"""Writing result files whole, with the permissions the user's umask gives:
bytes, JSON and figures."""

import io
import json
import math
import os
import pathlib
import secrets
from typing import Any


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


def json_safe(value: Any) -> Any:
  """`value` with NaN floats replaced by None (JSON has no NaN)."""
  if isinstance(value, dict):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes `value` as indented JSON (NaN as null), atomically."""
  write_atomic(path, (json.dumps(json_safe(value), indent=2) + '\n').encode())


def figure_png(figure) -> bytes:
  """The PNG bytes of a matplotlib Figure (no pyplot, no display needed)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  return buffer.getvalue()
