"""Swin-UNet + SelfReg on GlaS (UCTransNet protocol, see glas_unet.py)."""

from configs import glas_unet


def get_config():
  return glas_unet.get_config(dataset='glas', model='swin_unet')
