"""What one benchmark invocation measures: the options every suite reads."""

import dataclasses

MODELS = ('unet', 'swin_unet')
DTYPES = ('float32', 'bfloat16')
TRAIN_BATCHES = (4, 8)
SMOKE_BATCH = 2
SMOKE_DTYPES = ('float32',)
TIMED_RUNS = 5
SMOKE_TIMED_RUNS = 2


@dataclasses.dataclass(frozen=True)
class Settings:
  """Options shared by the suites.

  Attributes:
    smoke: tiny models, images, volumes and data; checks that every suite
      runs, measures nothing.
    runs: timed runs per measurement (the median is reported).
    models: model names of the model suites ('unet', 'swin_unet').
    batches: train-step (and SelfReg loss) batch sizes.
    dtypes: computation dtypes of the model suites.
  """
  smoke: bool = False
  runs: int = TIMED_RUNS
  models: tuple[str, ...] = MODELS
  batches: tuple[int, ...] = TRAIN_BATCHES
  dtypes: tuple[str, ...] = DTYPES
