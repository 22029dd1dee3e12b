"""Swin-UNet + SelfReg on Synapse (public recipe: SGD lr 0.05, batch 32, poly).

Set `--config.init.pretrained=/path/to/swin_tiny_patch4_window7_224.pth` for the
ImageNet Swin-T initialisation the paper uses.
"""

from configs import base


def get_config():
  config = base.get_config(dataset='synapse', model='swin_unet')
  config.optimizer.update(name='sgd', learning_rate=0.05, momentum=0.9,
                          weight_decay=1e-4, schedule='poly')
  config.loss.update(ce_weight=0.4, dice_weight=0.6, selfreg_weight=0.01)
  config.batch_size = 32
  config.num_epochs = 150
  return config
