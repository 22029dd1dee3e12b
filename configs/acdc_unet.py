"""UNet + SelfReg on ACDC (public recipe: AdamW lr 1e-4 constant, batch 12)."""

from configs import acdc_swin


def get_config():
  return acdc_swin.get_config(model='unet')
