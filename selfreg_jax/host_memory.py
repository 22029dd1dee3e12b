"""Transparent huge pages for XLA:CPU's buffers (entry points call this first).

XLA:CPU allocates an executable's temporary buffers (GBs for a full-size
train step) afresh on every run, and glibc's malloc serves and returns them
with mmap/munmap, so the kernel faults in and zeroes every 4 KiB page again
each step: 490,000 page faults and 1.6 s of system time per Swin-UNet step at
batch 4 (measured). With glibc's `glibc.malloc.hugetlb=1` tunable malloc asks
for transparent huge pages on those mappings (2 MiB pages, 1,400 faults per
step): the Swin-UNet step went from 3.05 s to 2.26 s, the UNet step from
13.6 s to 8.9 s on the 2-core development machine (benchmarks/NOTES.md item
11).

glibc reads tunables only at process start, so the process restarts itself
once with the tunable set. Set GLIBC_TUNABLES yourself (even to '') to keep
the process as started.
"""

import os
import sys

HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
# The tunable exists from glibc 2.35 on.
MIN_GLIBC = (2, 35)


def _glibc_version() -> tuple[int, ...] | None:
  try:
    name_version = os.confstr('CS_GNU_LIBC_VERSION')
  except (ValueError, OSError):
    return None
  if not name_version or not name_version.startswith('glibc '):
    return None
  return tuple(int(part) for part in name_version.split()[1].split('.')[:2])


def restart_with_huge_pages() -> None:
  """Re-executes this process with glibc's huge-page tunable, if it can help.

  Returns without restarting when GLIBC_TUNABLES is already set, or when the
  C library is not glibc >= 2.35 (the tunable would be ignored).
  """
  if 'GLIBC_TUNABLES' in os.environ:
    return
  version = _glibc_version()
  if version is None or version < MIN_GLIBC:
    return
  os.environ['GLIBC_TUNABLES'] = HUGE_PAGES_TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
