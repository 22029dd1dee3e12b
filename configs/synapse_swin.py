"""Swin-UNet + SelfReg on Synapse (public recipe: SGD lr 0.05, momentum 0.9,
wd 1e-4, batch 32, 150 epochs, poly decay, CE/Dice 0.4/0.6, SelfReg 0.01).

Set `--config.init.pretrained=/path/to/swin_tiny_patch4_window7_224.pth` for the
ImageNet Swin-T initialisation the paper uses.

Protocol 'paper' (build the data set with `--val-cases 0`): the public
trainer trains on all 18 training cases and validates nothing; its test
script scores a fixed epoch. For the Swin-UNet that is `epoch_125.pth`, which
the trainer writes after 126 epochs (it numbers epochs from 0), hence
'epoch:126'. The UNet's test script instead scores every other epoch from
82 to 150 on the test set, a choice made on test data; we test the last one.
"""

from configs import base

# model -> (learning rate, global batch, SelfReg lambda, tested checkpoint) of
# the public code, which weights SCR and IFD with the same lambda.
RECIPES = {'swin_unet': (0.05, 32, 0.01, 'epoch:126'),
           'unet': (0.01, 24, 0.015, 'latest')}


def get_config(model: str = 'swin_unet'):
  learning_rate, batch_size, selfreg_lambda, checkpoint = RECIPES[model]
  config = base.get_config(dataset='synapse', model=model)
  config.protocol = 'paper'
  config.eval.checkpoint = checkpoint
  config.optimizer.update(name='sgd', learning_rate=learning_rate,
                          momentum=0.9, weight_decay=1e-4, schedule='poly')
  config.loss.update(ce_weight=0.4, dice_weight=0.6,
                     scr_weight=selfreg_lambda, ifd_weight=selfreg_lambda)
  config.batch_size = batch_size
  config.num_epochs = 150
  return config
