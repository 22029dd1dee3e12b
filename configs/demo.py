"""The built-in demo: a small UNet on synthetic phantom CT, a few minutes on CPU.

The data set (`selfreg_demo`) is generated on first use, so nothing needs to be
downloaded. Ends with the evaluation table of the test phantoms.
"""

from configs import base


def get_config():
  config = base.get_config(dataset='demo', model='unet')
  config.dataset.image_size = 64
  config.model.widths = (16, 32, 64, 128, 256)
  config.optimizer.update(name='adamw', learning_rate=2e-3, weight_decay=1e-4,
                          schedule='constant')
  config.loss.update(ce_weight=0.4, dice_weight=0.6, scr_weight=0.015,
                     ifd_weight=0.015)
  config.batch_size = 8
  config.num_train_steps = 300
  config.log_every_steps = 25
  config.image_summary_every_steps = 100
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.eval.batch_size = 16
  return config
