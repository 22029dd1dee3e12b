"""Tiny training runs for the tests: `--config tests/tiny_train_config.py:MODEL`.

The demo recipe with a tiny UNet or Swin-UNet (from tiny_configs) at 32 px;
the tests point `dataset.data_dir` at a tiny demo set they build. The
Swin-UNet has two stages (both with shifted windows): these runs test the
training loop, and its compile is half that of the four-stage model.
"""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import tiny_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import demo  # pylint: disable=g-import-not-at-top,wrong-import-position

# Options of the tiny demo data set the tests build (data_prep.demo).
DEMO_OPTIONS = dict(num_train_cases=2, num_validation_cases=1,
                    num_test_cases=1, min_slices=4, max_slices=6,
                    min_size=36, max_size=44)


def get_config(model: str = 'unet'):
  config = demo.get_config()
  size = tiny_configs.IMAGE_SIZES[0]
  config.dataset.image_size = size
  tiny = (tiny_configs.tiny_unet() if model == 'unet'
          else tiny_configs.tiny_swin(size, num_stages=2))
  tiny.num_classes = config.dataset.num_classes
  config.model = tiny
  config.batch_size = 8
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.image_summary_every_steps = 3
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 3
  config.eval.batch_size = 8
  return config
