"""Swin-UNet + SelfReg on MoNuSeg (UCTransNet protocol, see glas_unet.py)."""

from configs import glas_unet


def get_config():
  return glas_unet.get_config(dataset='monuseg', model='swin_unet')
