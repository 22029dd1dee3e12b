"""The method: models, losses, input pipeline, config checks, checkpoints
and the run context."""
