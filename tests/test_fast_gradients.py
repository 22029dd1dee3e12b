"""The platform gradient tricks must compute what the plain JAX calls do:
values and gradients of the conv against lax.conv_general_dilated, of
take_channels against NumPy indexing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import tiny_configs as tc
from selfreg_jax.core.models import fast_gradients

# (kernel, stride, padding, in channels, out channels, image size): the
# UNet's 3x3 "same" conv (even and odd sizes; widening and narrowing, whose
# wide layers' kernel gradients take different forms), 1x1 convs, the Swin
# patch embedding, asymmetric padding, and a case that falls back to XLA
# (stride 2).
CASES = [(3, 1, ((1, 1), (1, 1)), 5, 7, 12),
         (3, 1, ((1, 1), (1, 1)), 4, 6, 9),
         (3, 1, ((1, 1), (1, 1)), 7, 5, 12),
         (3, 1, ((0, 2), (2, 0)), 6, 4, 8),
         (1, 1, ((0, 0), (0, 0)), 5, 3, 12),
         (4, 4, ((0, 0), (0, 0)), 3, 8, 16),
         (3, 2, ((1, 1), (1, 1)), 4, 6, 10),
         (3, 1, ((0, 2), (2, 0)), 4, 6, 8),
         (3, 1, 'SAME', 4, 6, 9),
         (1, 1, 'SAME', 5, 3, 12),
         (4, 4, 'VALID', 3, 8, 16)]
# The cases whose gradient `lax.platform_dependent` selects by platform.
STRIDE1_CASES = [case for case in CASES
                 if case[0] > 1 and case[1] == 1 and not isinstance(case[2], str)]


def _conv(fn, x, w, stride, padding):
  numbers = lax.conv_dimension_numbers(x.shape, w.shape,
                                       ('NHWC', 'HWIO', 'NHWC'))
  return fn(x, w, (stride, stride), padding, dimension_numbers=numbers)


@pytest.mark.parametrize('kernel,stride,padding,cin,cout,size', CASES)
def test_matches_lax_value_and_gradients(kernel, stride, padding, cin, cout,
                                         size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout))

  def loss(fn):
    return lambda x, w: jnp.sum(jnp.sin(_conv(fn, x, w, stride, padding)))

  ours = jax.jit(jax.value_and_grad(
      loss(fast_gradients.conv_general_dilated), argnums=(0, 1)))(x, w)
  reference = jax.jit(jax.value_and_grad(loss(lax.conv_general_dilated),
                                         argnums=(0, 1)))(x, w)
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('options', [{}, {'band_elements': 400},
                                     {'banded_kernel_elements': 0}])
@pytest.mark.parametrize('kernel,stride,padding,cin,cout,size', STRIDE1_CASES)
def test_default_branch_gradients_equal_the_cpu_branch(kernel, stride, padding,
                                                       cin, cout, size,
                                                       options):
  """What other platforms run (XLA's own gradients) and what XLA:CPU runs
  (the kernel gradient as matrix products), both called directly here: in
  bands of the whole image, in bands of one or two rows, and as whole-batch
  products (the wide layers' form)."""
  del stride
  x = jax.random.normal(jax.random.key(0), (tc.BATCH, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout))
  out_size = size + padding[0][0] + padding[0][1] - kernel + 1
  grad_out = jax.random.normal(jax.random.key(2),
                               (tc.BATCH, out_size, out_size, cout))
  # pylint: disable=protected-access
  cpu_branch = functools.partial(fast_gradients._matmul_gradients, **options)
  branches = [jax.jit(functools.partial(fn, padding, None))(x, w, grad_out)
              for fn in (cpu_branch, fast_gradients._xla_gradients)]
  for cpu, default in zip(*branches, strict=True):
    np.testing.assert_allclose(cpu, default, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('height,width', [(8, 8), (7, 9)])
def test_max_pool_matches_flax_value_and_gradient_with_ties(height, width):
  """Values from {0, 1, 2} tie often: like `nn.max_pool` (and PyTorch's
  max_pool2d), each window's gradient goes to its first maximum in
  row-major order; an odd last row or column gets none."""
  x = jax.random.randint(jax.random.key(5), (tc.BATCH, height, width, 3), 0,
                         3).astype(jnp.float32)
  weights = jax.random.normal(jax.random.key(6),
                              (tc.BATCH, height // 2, width // 2, 3))

  def loss(pool):
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(weights * pool(x))))

  value, grad = loss(fast_gradients.max_pool_2x2)(x)
  want_value, want_grad = loss(
      lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))(x)
  np.testing.assert_array_equal(value, want_value)
  np.testing.assert_array_equal(grad, want_grad)
  assert np.count_nonzero(grad) == weights.size  # one position per window


def test_take_channels_matches_numpy_value_and_gradient():
  """Distinct indices that leave channels out: the value is x[..., index];
  the gradient puts the output gradient back on the drawn channels and zero
  on the others."""
  x = np.asarray(jax.random.normal(jax.random.key(3), (tc.BATCH, 4, 4, 6)))
  index = np.array([4, 0, 2])
  weights = np.asarray(jax.random.normal(jax.random.key(4),
                                         (tc.BATCH, 4, 4, len(index))))
  value, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(
      weights * fast_gradients.take_channels(x, jnp.asarray(index)))))(x)
  expected_grad = np.zeros_like(x)
  expected_grad[..., index] = weights
  np.testing.assert_allclose(value, np.sum(weights * x[..., index]),
                             rtol=1e-5)
  np.testing.assert_array_equal(grad, expected_grad)


def test_matrix_dot_general_dense_matches_plain_dense_and_its_gradients():
  """A Dense layer on windowed tokens (B, nH, nW, N, C), as in Swin-UNet:
  the same parameters, value and gradients as `nn.Dense` with XLA's own
  `dot_general`."""
  x = jax.random.normal(jax.random.key(5), (tc.BATCH, 2, 3, 4, 6))
  plain = nn.Dense(5)
  ours = nn.Dense(5, dot_general=fast_gradients.matrix_dot_general)
  variables = plain.init(jax.random.key(6), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(6), x))
          == jax.tree.map(jnp.shape, variables))

  def loss(layer):
    return jax.jit(jax.value_and_grad(
        lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x))), argnums=(0, 1)))

  got, want = loss(ours)(variables, x), loss(plain)(variables, x)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-5)


def test_matrix_dot_general_kernel_gradient_copies_nothing():
  """The reason for it: with XLA's own dot_general the kernel gradient over
  windowed tokens transposes its input first; over the matrix view the
  compiled gradient holds no transpose and no copy."""
  x = jnp.ones((tc.BATCH, 2, 3, 16, 8))

  def compiled_gradient(layer):
    variables = layer.init(jax.random.key(0), x)
    return jax.jit(jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2))).lower(
        variables).compile().as_text()

  plain = compiled_gradient(nn.Dense(12))
  ours = compiled_gradient(
      nn.Dense(12, dot_general=fast_gradients.matrix_dot_general))
  assert ' transpose(' in plain or ' copy(' in plain
  assert ' transpose(' not in ours and ' copy(' not in ours


def test_matrix_dot_general_rejects_other_contractions():
  with pytest.raises(ValueError, match='last axis of lhs'):
    fast_gradients.matrix_dot_general(jnp.ones((2, 3, 4)), jnp.ones((3, 5)),
                                      (((1,), (0,)), ((), ())))


def test_cpu_kernel_gradient_avoids_the_window_convolution():
  """On CPU the 3x3 kernel gradient is matrix products, not a big-window
  convolution (the slow XLA:CPU path this module exists to avoid)."""
  x = jnp.zeros((2, 16, 16, 4))
  w = jnp.zeros((3, 3, 4, 8))
  grad_w = jax.jit(jax.grad(
      lambda w: jnp.sum(_conv(fast_gradients.conv_general_dilated, x, w, 1,
                              ((1, 1), (1, 1)))))).lower(w).compile()
  hlo = grad_w.as_text()
  window_convs = [line for line in hlo.splitlines()
                  if 'convolution(' in line and 'window={size=16x16' in line]
  assert not window_convs
  assert 'dot(' in hlo or 'dot_general' in hlo or '__ynn_fusion' in hlo


def test_flax_default_padding_takes_the_fast_paths():
  """Flax passes its default padding as the string 'SAME': the 1x1 conv
  (the UNet's and Swin-UNet's output layers) is still one matrix product and
  the 3x3 kernel gradient still matrix products, so the compiled gradient
  holds no convolution at all."""
  x = jnp.zeros((2, 16, 16, 4))
  for kernel in ((1, 1), (3, 3)):
    layer = fast_gradients.Conv(8, kernel, use_bias=False)
    variables = layer.init(jax.random.key(0), x)
    hlo = jax.jit(jax.grad(lambda v, x: jnp.sum(layer.apply(v, x) ** 2),
                           argnums=(0, 1))).lower(variables, x).compile()
    backward = [line for line in hlo.as_text().splitlines()
                if 'convolution(' in line and 'window={size=16x16' in line]
    assert not backward, kernel
    if kernel == (1, 1):
      assert 'convolution(' not in hlo.as_text()


def test_flax_conv_with_it_keeps_parameter_layout():
  layer = fast_gradients.Conv(6, (3, 3), padding=1)
  plain = nn.Conv(6, (3, 3), padding=1)
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 3))
  variables = plain.init(jax.random.key(3), x)
  assert (jax.tree.map(jnp.shape, layer.init(jax.random.key(3), x))
          == jax.tree.map(jnp.shape, variables))
  np.testing.assert_allclose(layer.apply(variables, x),
                             plain.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_bfloat16_kernel_gradient_keeps_dtype():
  x = jnp.ones((1, 8, 8, 3), jnp.bfloat16)
  w = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  grad = jax.grad(lambda w: jnp.sum(_conv(
      fast_gradients.conv_general_dilated, x, w, 1, ((1, 1), (1, 1))).astype(
          jnp.float32)))(w)
  assert grad.dtype == jnp.bfloat16
  # The centre tap sees all 64 pixels, a corner tap 7 x 7 of them.
  assert float(grad[1, 1, 0, 0]) == 64.0
  assert float(grad[0, 0, 0, 0]) == 49.0
