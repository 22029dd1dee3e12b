"""selfreg-jax: SelfReg-UNet (MICCAI 2024) in JAX/Flax.

Layout, each floor importing only from the floors above it in this list:

  common/      process plumbing: flags and one-line errors (cli), atomic files,
               process settings (runtime), joining a multi-process job
  core/        the method: models/, losses (where the loss is), input_pipeline
               (where data enters), configuration checks, checkpoints, and the
               run context every entry point builds once (context)
  evaluation/  slice-wise inference, metrics, evaluation of a split, images
  interop/     PyTorch checkpoints: reading them, ImageNet init, conversion
  train.py     the training loop (where a step runs)
  tools/       analysis (Grad-CAM), sweeps, reports, collective checks
"""
