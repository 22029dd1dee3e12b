"""Swin-UNet + SelfReg on Synapse (public recipe: SGD lr 0.05, momentum 0.9,
wd 1e-4, batch 32, 150 epochs, poly decay, CE/Dice 0.4/0.6, SelfReg 0.01).

Set `--config.init.pretrained=/path/to/swin_tiny_patch4_window7_224.pth` for the
ImageNet Swin-T initialisation the paper uses.
"""

from configs import base

# model -> (learning rate, global batch, SelfReg lambda) of the public code,
# which weights SCR and IFD with the same lambda.
RECIPES = {'swin_unet': (0.05, 32, 0.01), 'unet': (0.01, 24, 0.015)}


def get_config(model: str = 'swin_unet'):
  learning_rate, batch_size, selfreg_lambda = RECIPES[model]
  config = base.get_config(dataset='synapse', model=model)
  config.optimizer.update(name='sgd', learning_rate=learning_rate,
                          momentum=0.9, weight_decay=1e-4, schedule='poly')
  config.loss.update(ce_weight=0.4, dice_weight=0.6,
                     scr_weight=selfreg_lambda, ifd_weight=selfreg_lambda)
  config.batch_size = batch_size
  config.num_epochs = 150
  return config
