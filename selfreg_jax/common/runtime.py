"""Process-wide settings for JAX/XLA and the libraries around it: the
platform workarounds, in one place. Every entry point (main.py, the sweep,
analysis, convert, the collectives and benchmark runners) calls
`prepare_process()` first, before JAX starts; importing `selfreg_jax` changes
nothing. The measurements behind each setting are in benchmarks/NOTES.md.

- XLA:CPU's memory-minimising op order instead of its concurrency-optimised
  scheduler (`--xla_cpu_enable_concurrency_optimized_scheduler=false` in
  XLA_FLAGS; NOTES item 20): XLA:CPU allocates an executable's temporary
  buffer afresh on every run, and this order makes the full-size UNet step's
  buffer about 3x smaller, and the step faster. Added only where no GPU or TPU
  plugin of JAX is installed, and not where XLA_FLAGS already names the
  option. XLA reads XLA_FLAGS when JAX starts its backends.
- glibc's malloc tunables (MALLOC_TUNABLES; NOTES items 11, 17, 30, 35):
  huge pages (`hugetlb=1`), one arena, no block of its own mapping and no
  trimming, so that malloc keeps the memory a step frees and hands it to the
  next step instead of the kernel faulting in and zeroing fresh pages (GBs)
  every step. The price is memory: the heap keeps its largest extent, which
  fragmentation makes up to about twice a step's own (NOTES item 35). glibc
  reads tunables only at process start, so the process restarts itself once
  with them. Set GLIBC_TUNABLES yourself (even to '') to keep the process as
  started; `glibc.malloc.hugetlb=1` alone gives the fresh pages as huge pages.
- JAX's classic (non-partitionable) threefry random numbers: the partitionable
  scheme makes XLA:CPU compile random-number code about 10x slower (NOTES
  item 25). Our draws are small (initialisation, SCR channel draws,
  stochastic-depth masks; the latter drawn per sample so that they do not
  depend on the sharding). Set through the
  JAX_THREEFRY_PARTITIONABLE environment variable too, so that processes
  started from this one (multi-process launches, tests) draw the same numbers.
- TensorFlow's oneDNN notice: CLU's summary writers import TensorFlow to write
  event files, and it prints two lines about its oneDNN kernels unless they
  are off (TF_ENABLE_ONEDNN_OPTS=0); it computes nothing for us.
"""

import importlib.metadata
import importlib.util
import os
import sys

MALLOC_TUNABLES = ':'.join((
    'glibc.malloc.hugetlb=1',
    'glibc.malloc.arena_max=1',
    'glibc.malloc.mmap_max=0',
    f'glibc.malloc.trim_threshold={2 ** 62}',
))
SCHEDULER_OPTION = 'xla_cpu_enable_concurrency_optimized_scheduler'
MEMORY_SCHEDULER_FLAG = f'--{SCHEDULER_OPTION}=false'
# The huge-page tunable exists from glibc 2.35 on.
MIN_GLIBC = (2, 35)


def _glibc_version() -> tuple[int, ...] | None:
  try:
    name_version = os.confstr('CS_GNU_LIBC_VERSION')
  except (ValueError, OSError):
    return None
  if not name_version or not name_version.startswith('glibc '):
    return None
  return tuple(int(part) for part in name_version.split()[1].split('.')[:2])


def restart_with_malloc_tunables() -> None:
  """Re-executes this process with MALLOC_TUNABLES, if they can help.

  Returns without restarting when GLIBC_TUNABLES is already set, or when the
  C library is not glibc >= 2.35 (the huge-page tunable would be ignored).
  """
  if 'GLIBC_TUNABLES' in os.environ:
    return
  version = _glibc_version()
  if version is None or version < MIN_GLIBC:
    return
  os.environ['GLIBC_TUNABLES'] = MALLOC_TUNABLES
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


def configure_libraries() -> None:
  """The classic threefry scheme for JAX and no oneDNN notice from TensorFlow,
  in this process and the ones it starts. Unlike the two settings above,
  these also work after JAX has started."""
  os.environ['JAX_THREEFRY_PARTITIONABLE'] = 'false'
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_threefry_partitionable', False)


def prepare_process() -> None:
  """Every setting of this module: what the entry points call first."""
  schedule_for_memory()
  restart_with_malloc_tunables()
  configure_libraries()
