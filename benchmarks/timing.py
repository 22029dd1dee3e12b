"""Timing, memory and result-file helpers shared by the benchmark suites.

Times are wall-clock seconds (`time.perf_counter`) of calls whose outputs
are waited for (`jax.block_until_ready`); compilation is timed apart from the
runs, and a run time is the median of several runs after warm-up. Beside
them, `host_clock` reads the host's share: the process's system time and the
hypervisor's steal, which make a virtual machine's step times scatter.
"""

import json
import os
import resource
import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax

from selfreg_jax.common import files


def device_summary() -> dict[str, Any]:
  """The accelerator and host this process runs on."""
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'count': jax.device_count()}


def describe_device(device: dict[str, Any]) -> str:
  return f"{device['platform']} ({device['device_kind']}) x{device['count']}"


class Compiled(NamedTuple):
  """A jitted call, compiled.

  Attributes:
    executable: the compiled executable.
    compile_s: seconds to trace, lower and compile it.
    flops: XLA's FLOP count of one call, or None if unknown.
  """
  executable: Any
  compile_s: float
  flops: float | None


def compile_jitted(jitted, *args) -> Compiled:
  """Compiles `jitted` for `args`, timing it and counting its FLOPs.

  The FLOPs are XLA's cost analysis of the lowered program, before backend
  passes, so every backend reports the same count (within 0.2% of XLA:CPU's
  count of the compiled program). The compiled program's analysis would not
  do on GPU: it leaves out the cuDNN and cuBLAS calls, and counted 10 GFLOP
  for a 736 GFLOP UNet step on an H200.
  """
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  flops = _flops(lowered.cost_analysis())
  start = time.perf_counter()
  executable = lowered.compile()
  return Compiled(executable, lower_s + time.perf_counter() - start, flops)


def run_times(fn: Callable[..., Any], args: Sequence[Any], *, runs: int,
              warmup: int = 1,
              next_args: Callable[[Any, Sequence[Any]], Sequence[Any]] | None
              = None) -> list[float]:
  """Seconds of each of `runs` calls `fn(*args)` after `warmup` untimed ones.

  `next_args(output, args)` gives the arguments of the next call (e.g. the
  new training state in place of a donated one); by default they repeat.
  """
  if runs < 1:
    raise ValueError(f'runs must be >= 1, got {runs}.')
  times = []
  for index in range(warmup + runs):
    seconds, output = timed_call(fn, *args)
    if index >= warmup:
      times.append(seconds)
    if next_args is not None:
      args = next_args(output, args)
  return times


def back_to_back_seconds(
    fn: Callable[..., Any], args: Sequence[Any], *, calls: int,
    next_args: Callable[[Any, Sequence[Any]], Sequence[Any]],
    warmup: int = 1) -> tuple[float, Sequence[Any]]:
  """(mean seconds per call, arguments of the next call) of `calls` calls
  dispatched one after another, waiting only for the last, after `warmup`
  calls waited for one by one.

  A training loop runs its steps like this: the host dispatches a step while
  the device still runs the one before. On an H200 the host's dispatch is
  1.5-2 ms of a 8.5 ms UNet step timed alone (item 18 of NOTES.md).
  """
  if calls < 1:
    raise ValueError(f'calls must be >= 1, got {calls}.')
  for _ in range(warmup):
    args = next_args(jax.block_until_ready(fn(*args)), args)
  start = time.perf_counter()
  for _ in range(calls):
    output = fn(*args)
    args = next_args(output, args)
  jax.block_until_ready(output)
  return (time.perf_counter() - start) / calls, args


def timed_call(fn: Callable[..., Any], *args) -> tuple[float, Any]:
  """(seconds, output) of one call `fn(*args)`, its output waited for."""
  start = time.perf_counter()
  output = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, output


class HostClock(NamedTuple):
  """Seconds so far: this process's system CPU time, and the CPU time a
  hypervisor gave to other guests, summed over this machine's CPUs (Linux's
  /proc/stat; None where there is none)."""
  system_s: float
  steal_s: float | None


def host_clock() -> HostClock:
  """The host's clocks now; subtract two readings for a call's share.

  On XLA:CPU most of a step's system time is the kernel faulting in and
  zeroing the step's fresh temporary buffer (NOTES.md items 11 and 30).
  """
  system_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime
  try:
    with open('/proc/stat', encoding='ascii') as stat:
      fields = stat.readline().split()  # cpu user nice system idle ... steal
    steal_s = int(fields[8]) / os.sysconf('SC_CLK_TCK')
  except (OSError, IndexError, ValueError):
    steal_s = None
  return HostClock(system_s, steal_s)


def host_seconds(start: HostClock, end: HostClock) -> HostClock:
  """The host's seconds between two readings of `host_clock`."""
  steal_s = (None if start.steal_s is None or end.steal_s is None
             else end.steal_s - start.steal_s)
  return HostClock(end.system_s - start.system_s, steal_s)


def median(times: Sequence[float]) -> float:
  return statistics.median(times)


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's memory plan of a compiled executable, in bytes (None if unknown).

  total_bytes = temp + argument + output - alias: buffers that outputs reuse
  from donated arguments (alias) count once.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  memory = {
      'temp_bytes': int(analysis.temp_size_in_bytes),
      'argument_bytes': int(analysis.argument_size_in_bytes),
      'output_bytes': int(analysis.output_size_in_bytes),
      'alias_bytes': int(analysis.alias_size_in_bytes),
  }
  memory['total_bytes'] = (memory['temp_bytes'] + memory['argument_bytes']
                           + memory['output_bytes'] - memory['alias_bytes'])
  return memory


def _flops(analysis) -> float | None:
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def device_peak_bytes() -> int | None:
  """Peak bytes in use on device 0 so far in this process (None where the
  backend keeps no statistics, as on CPU). The peak never decreases and
  counts compile-time scratch too (GPU autotuning took it to 5.1 GB on an
  H200 where XLA planned 1.1 GB for the UNet step), so it bounds, not
  measures, the memory of the measurement just run: see `compiled_memory`
  for that."""
  stats = jax.devices()[0].memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


def device_memory_bytes() -> int:
  """The memory of device 0 for programs: the accelerator's limit, or on CPU
  the host's physical memory."""
  stats = jax.devices()[0].memory_stats()
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit'])
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def format_bytes(count: int | None) -> str:
  return 'n/a' if count is None else f'{count / 2**20:.1f} MiB'


def write_json(path: str | os.PathLike, payload: Any) -> None:
  """Writes `payload` as JSON through a temporary file beside `path`, then
  renames it over `path`, so that no half-written file is ever left."""
  files.write_atomic(path, json.dumps(payload, indent=2).encode())
