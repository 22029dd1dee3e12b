"""Tests for selfreg_jax.common.files: whole-file writes with the umask's mode."""

import json
import os

import pytest

from selfreg_jax.common import files

OLD, NEW = b'old contents\n', b'new contents\n'


@pytest.mark.parametrize('umask', [0o002, 0o027, 0o077], indirect=True,
                         ids=oct)
def test_write_atomic_gives_the_umask_mode(tmp_path, umask):
  path = tmp_path / 'made' / 'summary.json'
  files.write_atomic(path, OLD)
  assert path.read_bytes() == OLD
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask
  files.write_atomic(path, NEW)
  assert path.read_bytes() == NEW
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask
  assert os.listdir(path.parent) == [path.name]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path,
                                                          monkeypatch):
  path = tmp_path / 'metrics.csv'
  path.write_bytes(OLD)

  def fail_to_rename(*unused_args):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', fail_to_rename)
  with pytest.raises(OSError, match='disk full'):
    files.write_atomic(path, NEW)
  assert path.read_bytes() == OLD
  assert os.listdir(tmp_path) == [path.name]


def test_write_json_writes_nan_as_null(tmp_path, umask):
  path = tmp_path / 'summary.json'
  files.write_json(path, {'dice': float('nan'), 'cases': [1.5, float('nan')]})
  assert json.loads(path.read_text()) == {'dice': None, 'cases': [1.5, None]}
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_figure_png_renders_a_figure_without_pyplot():
  from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top
  figure = mpl_figure.Figure(figsize=(2, 1))
  figure.subplots().plot([0, 1], [1, 0])
  assert files.figure_png(figure).startswith(b'\x89PNG\r\n\x1a\n')
