"""UNet + SelfReg on GlaS (UCTransNet protocol: Adam lr 1e-3, cosine warm
restarts, batch 4, Dice+BCE 0.5/0.5, early stopping on validation Dice).

Protocol 'validated': UCTransNet stops early on validation Dice and tests the
best validation checkpoint, so the set needs its validation split.
"""

from configs import base


def get_config(dataset: str = 'glas', model: str = 'unet'):
  config = base.get_config(dataset=dataset, model=model)
  config.protocol = 'validated'
  config.optimizer.update(name='adam', learning_rate=1e-3,
                          schedule='cosine_restarts', restart_epochs=10,
                          min_learning_rate=1e-4)
  config.loss.update(ce_weight=0.5, dice_weight=0.5, scr_weight=0.015,
                     ifd_weight=0.015)
  config.batch_size = 4
  config.num_epochs = 2000
  config.early_stopping_patience = 50
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config
