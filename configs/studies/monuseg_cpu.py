"""MoNuSeg on a CPU: the paper's UNet, baseline vs SelfReg, seeds 0, 1, 2.

A CPU-sized version of the paper's MoNuSeg comparison (UNet 76.45 -> 80.18
Dice with SelfReg). Build the data once, then run the six points (resumable:
rerun the same command after an interruption); the sweep writes report.md,
report.csv, arms.csv and mean_dice.png into its workdir:

  python -m data_prep.build monuseg --src ../shared/data/MoNuSeg
  python -m selfreg_jax.tools.sweep --config configs/studies/monuseg_cpu.py \
      --workdir runs/monuseg_cpu

Protocol (results/monuseg_cpu/README.md has the measurements behind it):
- data: MoNuSeg as built by data_prep.build, 24 train / 6 validation / 14
  test images, trained and evaluated at 224 x 224 (configs/monuseg_unet.py);
- model and recipe: the paper's full-width UNet with the UCTransNet recipe of
  configs/monuseg_unet.py (Adam 1e-3, cosine warm restarts, batch 4,
  Dice + BCE 0.5 / 0.5);
- arms: `loss.use_selfreg` False (baseline) and True with the paper's
  lambda1 = lambda2 = 0.015 (`loss.scr_weight`, `loss.ifd_weight`);
- budget: TRAIN_STEPS steps per run instead of 2000 epochs with early
  stopping; validation Dice every VALIDATE_EVERY steps, and the test split
  evaluated at the best validated checkpoint, in the paper's metric mode.
"""

from configs import monuseg_unet

TRAIN_STEPS = 120
VALIDATE_EVERY = 10
SEEDS = (0, 1, 2)


def get_config():
  config = monuseg_unet.get_config()
  config.loss.update(scr_weight=0.015, ifd_weight=0.015)
  config.num_train_steps = TRAIN_STEPS
  config.early_stopping_patience = 0
  config.eval_every_steps = VALIDATE_EVERY
  config.checkpoint_every_steps = VALIDATE_EVERY
  config.log_every_steps = 10
  config.image_summary_every_steps = 50
  config.eval.checkpoint = 'best'
  config.eval.split = 'test'
  config.eval.metric_mode = 'paper'
  # The sweep runs the seed outermost: each seed's baseline and SelfReg runs
  # finish together, so an interrupted study still has complete pairs.
  config.sweep = {'seed': list(SEEDS),
                  'loss': {'use_selfreg': [False, True]}}
  return config
