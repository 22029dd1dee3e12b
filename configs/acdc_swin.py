"""Swin-UNet + SelfReg on ACDC (public recipe: AdamW lr 1e-4, wd 1e-4, constant,
batch 12, 400 epochs, CE/Dice 0.3/0.7, SelfReg weight 0.1).

Protocol 'validated', which is what the public ACDC script does: it trains on
the 70 patients of the reference split (lists_ACDC/train.txt), validates on
its 10 validation patients after every epoch and tests the checkpoint of the
best validation Dice (best.pth). Build the data set with its default split
(70 / 10 / 20 patients, the reference lists). The script validates every
epoch; eval_every_steps here keeps the base's interval (set it to the logged
steps per epoch to validate as often).
"""

from configs import base


def get_config(model: str = 'swin_unet'):
  config = base.get_config(dataset='acdc', model=model)
  config.protocol = 'validated'
  config.optimizer.update(name='adamw', learning_rate=1e-4, weight_decay=1e-4,
                          schedule='constant')
  config.loss.update(ce_weight=0.3, dice_weight=0.7, scr_weight=0.1,
                     ifd_weight=0.1)
  config.batch_size = 12
  config.num_epochs = 400
  return config
