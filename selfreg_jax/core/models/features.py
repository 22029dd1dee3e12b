"""The tapped activations that the SelfReg losses regularise.

Every model returns `(logits, Features)`. All maps are NHWC. A model with one
tap per stage (the CNN UNet) fills `encoder`/`decoder`; a model whose stages are
stacks of blocks (the Swin-UNet) also fills `encoder_first`/`decoder_first` with
the first block's output, `encoder`/`decoder` holding the last block's output.
"""

from typing import Tuple

import flax.struct
import jax

Maps = Tuple[jax.Array, ...]


@flax.struct.dataclass
class Features:
  """Feature taps of one forward pass.

  Attributes:
    encoder: per encoder stage, shallow to deep, the stage output (last block).
    decoder: per tapped decoder stage, deep to shallow, the stage output (last
      block).
    final: the full-resolution decoder map before the output projection.
    encoder_first: per encoder stage, the first block's output (empty if the
      model has no block stacks).
    decoder_first: per tapped decoder stage, the first block's output.
  """
  encoder: Maps
  decoder: Maps
  final: jax.Array
  encoder_first: Maps = ()
  decoder_first: Maps = ()

  def tap_groups(self) -> Tuple[Tuple[Maps, Maps], ...]:
    """The (encoder, decoder) tap groups the SelfReg loss averages over."""
    groups = ((self.encoder, self.decoder),)
    if self.encoder_first or self.decoder_first:
      groups += ((self.encoder_first, self.decoder_first),)
    return groups
