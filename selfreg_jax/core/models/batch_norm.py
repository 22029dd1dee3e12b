"""BatchNorm with PyTorch's semantics (`torch.nn.BatchNorm2d`), channels last.

Training normalises with the batch mean and the BIASED batch variance over
every axis but the last, and updates the running statistics as PyTorch does:
`running = (1 - momentum) * running + momentum * batch_statistic`, where the
variance that enters the running average is the UNBIASED one, `var * n / (n -
1)` with n the number of values per channel (B*H*W of the global batch: under
a device mesh the arrays are global, so the statistics are too; PyTorch
refuses n = 1, where this keeps the biased variance, 0). Flax's own
BatchNorm averages the biased variance, so its eval-mode outputs drift from
those of converted PyTorch weights. Evaluation normalises with the running
statistics. Variable names match Flax's BatchNorm (params `scale`, `bias`;
batch_stats `mean`, `var`), so checkpoints and the PyTorch name map are
unchanged.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """PyTorch BatchNorm over the last axis.

  Attributes:
    momentum: PyTorch's momentum, the weight of the new batch statistic.
    epsilon: added to the variance before the square root.
    dtype: dtype of the output; statistics are computed in float32.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: (..., C) -> (..., C) normalised, scaled and shifted per channel."""
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros,
                                 (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,),
                                jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.maximum(jnp.mean(jnp.square(x32), axis=axes)
                        - jnp.square(mean), 0.0)
      if not self.is_initializing():
        count = x.size // channels
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = ((1 - self.momentum) * running_mean.value
                              + self.momentum * mean)
        running_var.value = ((1 - self.momentum) * running_var.value
                             + self.momentum * unbiased)
    else:
      mean, var = running_mean.value, running_var.value
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((x32 - mean) * multiplier + bias).astype(self.dtype)
