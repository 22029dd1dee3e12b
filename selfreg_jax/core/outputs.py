"""A model's output channels and the classes they stand for.

The one home of the convention that a binary data set (classes 0 and 1) may be
segmented with ONE sigmoid logit, as UCTransNet's GlaS / MoNuSeg models do
(docs/design.md section 2), instead of one softmax logit per class. Everything
that depends on it asks here: the recipes' heads, config validation, the loss
(Dice+BCE instead of Dice+CE), class maps, Grad-CAM scores and log names.

Shapes: logits (..., K) with K = the model's outputs (config.model.num_classes).
"""

import jax
import jax.numpy as jnp

# Largest class count whose ids fit uint8 class maps.
MAX_CLASSES = 256


def paper_outputs(num_classes: int) -> int:
  """The recipes' head for a data set of `num_classes` classes (background
  included): one sigmoid logit for a binary set, else one logit per class."""
  return 1 if num_classes == 2 else num_classes


def fitting_outputs(num_classes: int) -> tuple[int, ...]:
  """Every head that fits a data set: one logit per class, or one sigmoid
  logit for a binary set."""
  return (num_classes, 1) if num_classes == 2 else (num_classes,)


def is_one_logit(num_outputs: int) -> bool:
  """Whether a head of `num_outputs` channels is the binary sigmoid head."""
  return num_outputs == 1


def class_ids(num_outputs: int) -> tuple[int, ...]:
  """The classes a head of `num_outputs` channels predicts scores for: class 1
  (the logit) for the sigmoid head, else 0..K-1."""
  return (1,) if is_one_logit(num_outputs) else tuple(range(num_outputs))


def class_map(logits: jax.Array) -> jax.Array:
  """(N, S, S, K) logits -> (N, S, S) uint8 class ids.

  Argmax over K logits, or sigmoid(logit) > 0.5 for the one-logit head.
  """
  logits = logits.astype(jnp.float32)
  num_outputs = logits.shape[-1]
  if num_outputs > MAX_CLASSES:
    raise ValueError(f'{num_outputs} classes do not fit uint8 class maps.')
  if is_one_logit(num_outputs):
    classes = jax.nn.sigmoid(logits[..., 0]) > 0.5
  else:
    classes = jnp.argmax(logits, axis=-1)
  return classes.astype(jnp.uint8)


def class_logit_and_region(logits: jax.Array,
                           class_id: int) -> tuple[jax.Array, jax.Array]:
  """Class `class_id`'s logit (B, H, W) and where it is predicted (bool).

  For the one-logit head, class 1 is the logit and its region logit > 0
  (sigmoid > 0.5); class_id may be traced.
  """
  if is_one_logit(logits.shape[-1]):
    logit = logits[..., 0]
    return logit, logit > 0
  return logits[..., class_id], jnp.argmax(logits, axis=-1) == class_id


def loss_part_names(num_outputs: int) -> dict[str, str]:
  """Logged name of each loss part: the CE term of the one-logit head is a
  binary cross-entropy, 'bce'."""
  return {'ce': 'bce' if is_one_logit(num_outputs) else 'ce',
          'dice': 'dice', 'scr': 'scr', 'ifd': 'ifd'}
