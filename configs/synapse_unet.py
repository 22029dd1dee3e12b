"""UNet + SelfReg on Synapse (public recipe: SGD lr 0.01, batch 24, poly)."""

from configs import base


def get_config():
  config = base.get_config(dataset='synapse', model='unet')
  config.optimizer.update(name='sgd', learning_rate=0.01, momentum=0.9,
                          weight_decay=1e-4, schedule='poly')
  config.loss.update(ce_weight=0.4, dice_weight=0.6, selfreg_weight=0.015)
  config.batch_size = 24
  config.num_epochs = 150
  return config
