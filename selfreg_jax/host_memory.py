"""XLA:CPU's per-step buffers: smaller, and on huge pages (entry points call
`prepare_process` first, before JAX starts).

XLA:CPU allocates an executable's temporary buffer (GBs for a full-size
train step) afresh on every run, and glibc's malloc serves and returns it
with mmap/munmap, so the kernel faults in and zeroes every page of it again
each step. Two settings cut that cost (benchmarks/NOTES.md items 11 and 20,
2-core development machine, batch 4, fp32):

- XLA:CPU's memory-minimising op order instead of its concurrency-optimised
  scheduler (`--xla_cpu_enable_concurrency_optimized_scheduler=false` in
  XLA_FLAGS): the UNet step's temporary buffer went from 4.5 to 1.4 GB and
  the step from 11.4 to 8.5-9.3 s; the Swin-UNet's from 1.9 to 1.6 GB, its
  step unchanged. XLA reads XLA_FLAGS when JAX starts its backends. The flag
  is added only where no GPU or TPU plugin of JAX is installed (its work is
  the CPU's), and not where XLA_FLAGS already names the option.
- glibc's `glibc.malloc.hugetlb=1` tunable, so that malloc asks for
  transparent huge pages on those mappings (2 MiB pages: 1,400 instead of
  490,000 faults per Swin-UNet step): the Swin-UNet step went from 3.05 s to
  2.26 s, the UNet step from 13.6 s to 8.9 s. glibc reads tunables only at
  process start, so the process restarts itself once with the tunable set.
  Set GLIBC_TUNABLES yourself (even to '') to keep the process as started.
"""

import importlib.metadata
import importlib.util
import os
import sys

HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
SCHEDULER_OPTION = 'xla_cpu_enable_concurrency_optimized_scheduler'
MEMORY_SCHEDULER_FLAG = f'--{SCHEDULER_OPTION}=false'
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


def accelerator_plugin_installed() -> bool:
  """Whether JAX can find a GPU or TPU plugin (the `jax_plugins` namespace or
  entry points, as JAX looks for them, or libtpu)."""
  if any(importlib.util.find_spec(name) is not None
         for name in ('jax_plugins', 'libtpu')):
    return True
  return bool(importlib.metadata.entry_points(group='jax_plugins'))


def schedule_for_memory() -> None:
  """Adds XLA:CPU's memory-minimising schedule to XLA_FLAGS, unless XLA_FLAGS
  already sets the scheduler option or an accelerator plugin is installed.
  Takes effect only if called before JAX starts its backends (its first
  computation)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if SCHEDULER_OPTION in flags or accelerator_plugin_installed():
    return
  os.environ['XLA_FLAGS'] = f'{flags} {MEMORY_SCHEDULER_FLAG}'.strip()


def prepare_process() -> None:
  """Both settings of this module: what the entry points call first."""
  schedule_for_memory()
  restart_with_huge_pages()
