"""Shared defaults; each config file in this folder holds only what differs.

Every field is documented here once. Dataset names are TFDS builder names
built by `python -m data_prep.build NAME`.
"""

import ml_collections
from ml_collections import config_dict

from selfreg_jax.core import outputs

# Per data set: TFDS name, input channels, label classes, volumetric cases.
DATASETS = {
    'demo': ('selfreg_demo', 1, 5, True),
    'synapse': ('selfreg_synapse', 1, 9, True),
    'acdc': ('selfreg_acdc', 1, 4, True),
    'glas': ('selfreg_glas', 3, 2, False),
    'monuseg': ('selfreg_monuseg', 3, 2, False),
}


def dataset_config(name: str, image_size: int = 224) -> ml_collections.ConfigDict:
  tfds_name, in_channels, num_classes, volumetric = DATASETS[name]
  return ml_collections.ConfigDict(dict(
      name=tfds_name,
      # TFDS data dir holding the built data set; None = ~/tensorflow_datasets.
      data_dir=config_dict.placeholder(str),
      image_size=image_size,     # square training / inference size, pixels
      in_channels=in_channels,
      num_classes=num_classes,   # label classes including background
      volumetric=volumetric,     # 3D cases evaluated per volume (Synapse, ACDC)
      train_split='train',
      val_split='validation',
      test_split='test',
      augment=True,              # docs/design.md section 3 training augmentation
      num_workers=0,             # grain worker processes (0 = in-process)
  ))


def model_config(name: str, dataset: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  """The paper-size model for a data set (binary sets get one sigmoid logit)."""
  config = ml_collections.ConfigDict(dict(
      name=name, num_classes=outputs.paper_outputs(dataset.num_classes),
      in_channels=dataset.in_channels))
  if name == 'unet':
    config.widths = (64, 128, 256, 512, 1024)
  else:
    config.update(image_size=dataset.image_size, patch_size=4, embed_dim=96,
                  depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
                  mlp_ratio=4.0, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.2)
  return config


def get_config(dataset: str = 'demo', model: str = 'unet'
               ) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # How the tested model is chosen (README, "Training and evaluation"):
  # 'validated': validate on the data set's 'validation' split (held out of
  #   training) every eval_every_steps; eval.checkpoint 'best' is the step of
  #   the highest validation Dice;
  # 'paper': train on every training case of a set built without validation
  #   split (`data_prep.build ... --val-cases 0`), never validate, and test
  #   the checkpoint the public script tests (eval.checkpoint 'epoch:N',
  #   'latest' or a step; that step is saved and kept).
  config.protocol = 'validated'
  config.dataset = dataset_config(dataset)
  config.model = model_config(model, config.dataset)
  # Computation dtype: 'float32' or 'bfloat16' (parameters stay float32).
  config.dtype = 'float32'

  config.loss = ml_collections.ConfigDict(dict(
      ce_weight=0.4,       # CE (or BCE for one-logit binary tasks)
      dice_weight=0.6,
      use_selfreg=True,    # False = the baseline without SCR and IFD
      # The paper's lambda_1 and lambda_2 (the public code uses one value for
      # both; 0 drops a term, e.g. ifd_weight=0 for SCR alone).
      scr_weight=0.015,
      ifd_weight=0.015,
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd',               # 'sgd' (momentum), 'adamw' or 'adam'
      learning_rate=0.01,
      momentum=0.9,             # sgd only
      weight_decay=1e-4,        # sgd: L2 added to the gradient; adamw: decoupled
      schedule='poly',          # 'poly', 'constant' or 'cosine_restarts'
      poly_power=0.9,           # lr * (1 - step / total_steps) ** power
      restart_epochs=10,        # cosine_restarts: period of one cycle
      min_learning_rate=1e-4,   # cosine_restarts: floor of each cycle
      grad_clip_norm=0.0,       # 0 = no clipping
  ))

  config.batch_size = 24        # global batch over all devices and processes
  # Training batches held on the devices, transferred ahead of the steps
  # using them (1 = each batch transferred just before its step).
  config.prefetch_to_device = 2
  config.num_epochs = 150
  config.num_train_steps = -1   # > 0 overrides num_epochs

  config.init = ml_collections.ConfigDict(dict(
      # ImageNet Swin-T checkpoint (swin_tiny_patch4_window7_224.pth) for the
      # Swin-UNet encoder and mirrored decoder; None = random init.
      pretrained=config_dict.placeholder(str),
      # Also load that checkpoint's final `norm` into the bottleneck LayerNorm,
      # as the public Swin-Unet load_from does; False keeps it at random init.
      load_final_norm=True,
  ))

  config.log_every_steps = 50
  config.image_summary_every_steps = 500   # 0 = never
  config.eval_every_steps = 1000           # validation; 0: at the end; -1: never
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3              # the last N, plus the best one
  config.early_stopping_patience = 0       # validations without gain; 0 = off

  config.eval = ml_collections.ConfigDict(dict(
      split='test',             # split of `--mode eval`
      # 'best', 'latest', a step number, or 'epoch:N': the step ending the
      # N-th epoch (N >= 1; a public script's 0-based epoch_{N-1}.pth).
      checkpoint='best',
      metric_mode='paper',      # 'paper' (published convention) or 'standard'
      batch_size=32,            # slices per inference batch (global)
      save_predictions=False,   # NIfTI predictions of 3D cases
      overlay_cases=(),         # case ids to render as PNG overlays
  ))
  return config
