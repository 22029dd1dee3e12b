"""Times the full-size models: compile + forward, and the train step.

  python -m benchmarks.model_bench [--models unet,swin_unet] [--batch 4]
      [--size 224] [--steps 5] [--dtype float32] [--out results.json] [--smoke]

For each model: the time of the first jit call of the eval forward (compile +
run), the steady forward time, the first train step (compile + run) and the
median steady train-step time with and without SelfReg. Prints the device.
"""

import argparse
import functools
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax

from configs import base
from selfreg_jax import train
from selfreg_jax.models import create_model


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def _config(model_name: str, size: int, smoke: bool) -> ml_collections.ConfigDict:
  config = base.get_config(dataset='synapse', model=model_name)
  config.dataset.image_size = size
  if model_name == 'swin_unet':
    config.model.image_size = size
  if smoke:
    if model_name == 'unet':
      config.model.widths = (8, 16, 32, 64, 128)
    else:
      config.model.update(patch_size=2, embed_dim=8, num_heads=(1, 2, 2, 4),
                          window_size=4)
  return config


def bench_model(model_name: str, *, batch: int, size: int, steps: int,
                dtype: str, smoke: bool) -> dict:
  config = _config(model_name, size, smoke)
  model = create_model(config.model, dtype=jnp.dtype(dtype))
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 1))
  labels = jax.random.randint(jax.random.key(1), (batch, size, size), 0,
                              config.model.num_classes)
  tx = optax.sgd(0.01, momentum=0.9)
  state = train.initial_state(model, tx, config, jax.random.key(0))
  forward = jax.jit(lambda v, x: model.apply(v, x)[0])
  _, forward_first = _timed(forward, state.variables(), images)
  forward_times = [_timed(forward, state.variables(), images)[1]
                   for _ in range(steps)]
  result = {'model': model_name, 'batch': batch, 'image_size': size,
            'dtype': dtype, 'forward_compile_and_run_s': forward_first,
            'forward_s': statistics.median(forward_times)}
  for selfreg in (True, False):
    loss_config = dict(config.loss, use_selfreg=selfreg)
    step = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx, loss_config=loss_config,
        base_key=jax.random.key(2)))
    run_state = state
    batch_data = {'image': images, 'label': labels}
    (run_state, _), first = _timed(step, run_state, batch_data)
    times = []
    for _ in range(steps):
      (run_state, _), seconds = _timed(step, run_state, batch_data)
      times.append(seconds)
    tag = 'selfreg' if selfreg else 'baseline'
    result[f'train_step_{tag}_compile_and_run_s'] = first
    result[f'train_step_{tag}_s'] = statistics.median(times)
  result['selfreg_overhead_pct'] = 100 * (
      result['train_step_selfreg_s'] / result['train_step_baseline_s'] - 1)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='unet,swin_unet')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--out', type=pathlib.Path)
  parser.add_argument('--smoke', action='store_true',
                      help='tiny models and images (for the test suite)')
  args = parser.parse_args()
  size = 32 if args.smoke else args.size
  steps = 2 if args.smoke else args.steps
  device = f'{jax.devices()[0].platform}: {jax.devices()[0].device_kind}'
  print(f'device {device} x{jax.device_count()}')
  results = []
  for name in args.models.split(','):
    result = bench_model(name, batch=args.batch, size=size, steps=steps,
                         dtype=args.dtype, smoke=args.smoke)
    results.append(result)
    print(f"{name:10s} forward: first call {result['forward_compile_and_run_s']:.1f} s,"
          f" then {result['forward_s']:.3f} s | train step: selfreg "
          f"{result['train_step_selfreg_s']:.3f} s, baseline "
          f"{result['train_step_baseline_s']:.3f} s "
          f"(overhead {result['selfreg_overhead_pct']:+.1f}%), first call "
          f"{result['train_step_selfreg_compile_and_run_s']:.1f} s")
  if args.out:
    with tempfile.NamedTemporaryFile('w', dir=args.out.parent or '.',
                                     delete=False, suffix='.tmp') as f:
      json.dump({'device': device, 'results': results}, f, indent=2)
    os.replace(f.name, args.out)


if __name__ == '__main__':
  main()
