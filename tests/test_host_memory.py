"""The entry points' restart with glibc's huge-page tunable."""

import os
import pathlib
import subprocess
import sys

from selfreg_jax import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Prints the process id before and after the (possible) restart, and the
# tunables the process ended up with.
SCRIPT = '''
import os, sys
print('start', os.getpid(), flush=True)
from selfreg_jax import host_memory
host_memory.restart_with_huge_pages()
print('tunables', os.environ.get('GLIBC_TUNABLES'), os.getpid())
'''


def _run(**env_changes) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env.update(env_changes, PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, '-c', SCRIPT], env=env,
                          capture_output=True, text=True, timeout=60,
                          check=True)
  return result.stdout.split('\n')


def _glibc_with_tunable() -> bool:
  version = host_memory._glibc_version()  # pylint: disable=protected-access
  return version is not None and version >= host_memory.MIN_GLIBC


def test_restarts_once_in_place_with_the_tunable():
  lines = _run()
  pid = lines[0].split()[1]
  if _glibc_with_tunable():
    assert lines[:3] == [f'start {pid}', f'start {pid}',
                         f'tunables {host_memory.HUGE_PAGES_TUNABLE} {pid}']
  else:
    assert lines[:2] == [f'start {pid}', f'tunables None {pid}']


def test_tunables_set_by_the_user_are_kept_and_nothing_restarts():
  for tunables in ('', 'glibc.malloc.hugetlb=0'):
    lines = _run(GLIBC_TUNABLES=tunables)
    pid = lines[0].split()[1]
    assert lines[:2] == [f'start {pid}', f'tunables {tunables} {pid}']
