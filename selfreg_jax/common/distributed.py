"""Multi-process JAX: joining a job, and starting one on this machine.

`initialize` is what every entry point calls: it starts JAX's multi-process
runtime when the launch asks for one. `launch_local` starts such a job on
one machine, each process with its own CPU devices: the tests, the
collectives analysis and the benchmarks simulate multi-host layouts with it.
"""

import os
import socket
import subprocess
import sys
from typing import Mapping, NamedTuple, Sequence

import jax

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def initialize() -> None:
  """Starts JAX's multi-process runtime when the launch asks for it.

  Explicitly when the launcher sets JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (as `launch_local` does), or with
  JAX's cluster auto-detection on a Cloud TPU pod slice, under SLURM or Open
  MPI. A single process needs nothing.
  """
  num_processes = int(os.environ.get('JAX_NUM_PROCESSES', '1'))
  if num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=num_processes,
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif (',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')
        or int(os.environ.get('SLURM_NTASKS', '1')) > 1
        or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1):
    jax.distributed.initialize()


class ProcessResult(NamedTuple):
  """What one process of a local job did (stdout and stderr as text)."""
  pid: int
  returncode: int
  stdout: str
  stderr: str


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def cpu_devices_env(devices: int, env: Mapping[str, str] | None = None
                    ) -> dict[str, str]:
  """`env` (default: this process's) for a JAX process on `devices` CPU
  devices: JAX_PLATFORMS=cpu and the device count appended to XLA_FLAGS."""
  env = dict(os.environ if env is None else env)
  flags = env.get('XLA_FLAGS', '')
  return dict(env, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'{flags} {DEVICE_COUNT_FLAG}={devices}'.strip())


def launch_local(args: Sequence[str], *, num_processes: int,
                 devices_per_process: int, timeout: float,
                 cwd: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None
                 ) -> list[ProcessResult]:
  """Runs `python ARGS` as one JAX job of `num_processes` local processes.

  Each process gets `devices_per_process` CPU devices (`cpu_devices_env`)
  and the coordinator variables `initialize` reads (a free local port);
  they run concurrently, and this waits for all of them.

  Args:
    args: the Python command line after the interpreter (a script or `-m`).
    num_processes: processes of the job.
    devices_per_process: CPU devices of each process.
    timeout: seconds to wait for each process; when one runs longer, all
      that still run are killed and subprocess.TimeoutExpired is raised.
    cwd: their working folder.
    env: their environment before the variables above (default: this
      process's).

  Returns:
    Each process's result, by process id.
  """
  port = _free_port()
  processes = []
  for process_id in range(num_processes):
    process_env = dict(cpu_devices_env(devices_per_process, env),
                       JAX_NUM_PROCESSES=str(num_processes),
                       JAX_PROCESS_ID=str(process_id),
                       JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}')
    processes.append(subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=process_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  try:
    for process in processes:
      stdout, stderr = process.communicate(timeout=timeout)
      results.append(ProcessResult(process.pid, process.returncode, stdout,
                                   stderr))
  finally:  # on a timeout, the processes still waiting for each other
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return results
