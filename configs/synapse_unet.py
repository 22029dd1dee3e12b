"""UNet + SelfReg on Synapse (public recipe: SGD lr 0.01, batch 24, poly decay,
SelfReg weight 0.015; the rest as in synapse_swin.py)."""

from configs import synapse_swin


def get_config():
  return synapse_swin.get_config(model='unet')
