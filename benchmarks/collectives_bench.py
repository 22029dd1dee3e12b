"""Suite `collectives`: what the full-size train step communicates on a pod.

Compile-only, on CPU devices whatever the machine. For every model, the
training loop's step of the Synapse recipe (`configs/synapse_swin.py`: 224
px, fp32, SelfReg on) is compiled by `python -m selfreg_jax.tools.collectives` in
fresh processes (`distributed.launch_local`), in two layouts:
- 1 process x 64 devices (the device count of a v5e-64 slice), and
- 2 processes x 4 devices (jax.distributed across processes, as on a
  multi-host pod),
at the recipe's global batch rounded up to a multiple of the devices. A
record is `selfreg_jax.tools.collectives.analyse`'s: the collectives of each kind
(instructions, arrays, bytes), the parameters' bytes, the bytes their
gradients' all-reduce must move (`collectives.gradient_bytes`) and the
all-reduced bytes beyond those (BatchNorm statistics, loss terms), and the
compile seconds. Smoke: the smoke models at 32 px on 1 process x 4 devices
only (each layout costs process start-ups and a compile; tests/
test_collectives.py compiles the tiny step across 2 processes), compiled
with most XLA optimisations off.
"""

import json
import os
import pathlib
import tempfile
from typing import Any, Iterator, Sequence

from benchmarks import model_setup
from benchmarks import settings as settings_lib
from configs import synapse_swin
from selfreg_jax.common import distributed
from selfreg_jax.tools import collectives

SUITE = 'collectives'
ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = 'configs/synapse_swin.py'
# (processes, devices per process)
LAYOUTS = ((1, 64), (2, 4))
SMOKE_LAYOUTS = ((1, 4),)
# Seconds each process may take (full-size compiles on a loaded 2-core CPU).
TIMEOUT_S = 3 * 3600


def _overrides(name: str, devices: int, smoke: bool) -> list[str]:
  """Command-line config overrides: the batch sizes (the recipe's rounded
  up to a multiple of `devices`) and, for smoke runs, the smoke model."""
  recipe_batch = synapse_swin.get_config(name).batch_size
  batch = -(-recipe_batch // devices) * devices
  args = [f'--config.batch_size={batch}', f'--config.eval.batch_size={batch}']
  if smoke:
    args.append(f'--config.dataset.image_size={model_setup.SMOKE_IMAGE_SIZE}')
    args += [f'--config.model.{field}={value!r}' for field, value in
             model_setup.SMOKE_MODEL_FIELDS[name].items()]
  return args


def analyse(name: str, processes: int, devices_per_process: int,
            smoke: bool) -> dict[str, Any]:
  """The collectives record of model `name`'s step in one layout."""
  env = dict(os.environ)
  if smoke:
    env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = 'true'
  with tempfile.TemporaryDirectory() as folder:
    out = pathlib.Path(folder) / 'record.json'
    results = distributed.launch_local(
        ['-m', 'selfreg_jax.tools.collectives', f'--config={RECIPE}:{name}',
         f'--out={out}',
         *_overrides(name, processes * devices_per_process, smoke)],
        num_processes=processes, devices_per_process=devices_per_process,
        timeout=TIMEOUT_S, cwd=ROOT, env=env)
    for process_id, result in enumerate(results):
      if result.returncode:
        raise RuntimeError(f'{name}: process {process_id} of {processes} '
                           f'failed:\n{result.stderr[-3000:]}')
    return {'suite': SUITE, **json.loads(out.read_text())}


def measurements(settings: settings_lib.Settings,
                 earlier: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  """One record per model and layout."""
  del earlier  # independent of other suites
  for name in settings.models:
    for processes, devices in (SMOKE_LAYOUTS if settings.smoke else LAYOUTS):
      yield analyse(name, processes, devices, settings.smoke)


def summary_line(record: dict[str, Any]) -> str:
  return collectives.summary_line(record)
