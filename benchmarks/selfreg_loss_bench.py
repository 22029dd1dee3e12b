"""Suite `selfreg_loss`: the SelfReg terms alone, value and gradient.

For every model, dtype and batch size: the feature taps of one forward pass
(`train=False`) feed `selfreg_jax.core.losses.selfreg_loss`; the jit-compiled
value and gradient of SCR + IFD with respect to those features is timed,
and compared with the SelfReg train step of the same model, batch and dtype:
the one the `train_step` suite measured in this invocation, else one timed
here.
"""

from typing import Any, Iterator, Sequence

import jax

from benchmarks import model_setup
from benchmarks import settings as settings_lib
from benchmarks import timing
from benchmarks import train_step_bench
from selfreg_jax.core import losses

SUITE = 'selfreg_loss'
LOSS_KEY_SEED = 3


def selfreg_value_and_grad(features, key: jax.Array):
  """(SCR + IFD, its gradient with respect to every feature map)."""
  def selfreg_sum(taps):
    terms = losses.selfreg_loss(taps, key)
    return terms.scr + terms.ifd
  return jax.value_and_grad(selfreg_sum)(features)


def _train_step_seconds(record: dict[str, Any],
                        earlier: Sequence[dict[str, Any]],
                        settings: settings_lib.Settings) -> tuple[float, str]:
  """Median SelfReg train-step seconds matching `record`, and its source."""
  fields = ('model', 'image_size', 'dtype', 'batch')
  for other in earlier:
    if (other['suite'] == train_step_bench.SUITE and other['selfreg']
        and all(other[f] == record[f] for f in fields)):
      return other['median_s'], train_step_bench.SUITE + ' suite'
  _, step = train_step_bench.measure_pair(record['model'], record['batch'],
                                          record['dtype'], settings)
  return step['median_s'], 'timed here'


def measure_loss(name: str, batch_size: int, dtype: str,
                 settings: settings_lib.Settings,
                 earlier: Sequence[dict[str, Any]]) -> dict[str, Any]:
  setup = model_setup.model_setup(name, dtype, settings.smoke)
  images = model_setup.synthetic_batch(setup.config, batch_size)['image']
  forward = jax.jit(lambda variables, x: setup.model.apply(variables, x)[1])
  features = forward(setup.state.variables(), images)
  key = jax.random.key(LOSS_KEY_SEED)
  compiled = timing.compile_jitted(jax.jit(selfreg_value_and_grad), features,
                                  key)
  times = timing.run_times(compiled.executable, (features, key),
                           runs=settings.runs)
  record = {'suite': SUITE, **model_setup.describe(setup.config),
            'batch': batch_size, 'compile_s': compiled.compile_s,
            'median_s': timing.median(times), 'runs_s': times}
  step_s, source = _train_step_seconds(record, earlier, settings)
  record.update(train_step_s=step_s, train_step_source=source,
                share_of_train_step_pct=100 * record['median_s'] / step_s)
  return record


def measurements(settings: settings_lib.Settings,
                 earlier: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  for name in settings.models:
    for dtype in settings.dtypes:
      for batch_size in settings.batches:
        yield measure_loss(name, batch_size, dtype, settings, earlier)


def summary_line(record: dict[str, Any]) -> str:
  return (f"{record['model']:9s} {record['image_size']}px batch "
          f"{record['batch']:<2d} {record['dtype']:8s}: compile "
          f"{record['compile_s']:6.1f} s, value + grad "
          f"{record['median_s']:.4f} s = "
          f"{record['share_of_train_step_pct']:.1f}% of a SelfReg train step "
          f"({record['train_step_s']:.4f} s, {record['train_step_source']})")
