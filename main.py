"""Trains and evaluates SelfReg-UNet models.

  python main.py --config configs/acdc_swin.py --workdir runs/acdc_swin
  python main.py --config configs/demo.py --workdir runs/demo \
      --config.num_train_steps=100 --mode train_and_eval

Multi-process runs join their job through
`selfreg_jax.common.distributed.initialize`: explicitly when the launcher sets
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (e.g. two CPU
processes on one machine), or with JAX's cluster auto-detection on a Cloud TPU
pod slice, under SLURM or Open MPI.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from selfreg_jax.common import runtime

if __name__ == '__main__':
  # Smaller XLA:CPU buffers on huge pages (restarts once), before the heavy
  # imports below.
  runtime.prepare_process()

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from data_prep import build
from selfreg_jax import train
from selfreg_jax.common import cli
from selfreg_jax.common import distributed
from selfreg_jax.core import checkpoints
from selfreg_jax.core import configuration

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, logs, eval.')
flags.DEFINE_enum('mode', 'train_and_eval', ['train', 'eval', 'train_and_eval'],
                  'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  distributed.initialize()
  # A config mistake is reported before the demo data is built.
  configuration.validate(FLAGS.config, FLAGS.mode)
  build.ensure_demo_dataset(FLAGS.config.dataset)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.mode,
                             cli.config_overrides())
  except (checkpoints.CheckpointError, train.NonFiniteLossError) as e:
    # A damaged checkpoint, a failed save (e.g. a full disk) or a diverged
    # run: the message says what and what to do; a traceback adds nothing.
    logging.error('%s', e)
    sys.exit(1)


if __name__ == '__main__':
  cli.run_app(main)
