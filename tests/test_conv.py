"""pdm_jax.models.conv: the re-formed backward of 3x3 layers equals lax's, and is used where meant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from pdm_jax.models import conv
from pdm_jax.models.layers import conv3x3

_DN = ("NHWC", "HWIO", "NHWC")


def _bands(shape, kernel=3, stride=1, padding="SAME"):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, kernel, shape[-1], 8), jnp.float32)
    dims = lax.conv_dimension_numbers(x.shape, w.shape, _DN)
    return conv._band_count(x, w, (stride, stride), padding, None, None, dims, 1, 1, {})


def test_band_count_only_for_small_batch_3x3_same():
    assert _bands((1, 16, 16, 4)) == 4
    assert _bands((2, 16, 16, 4)) == 2
    assert _bands((3, 16, 16, 4)) == 1           # 4 // 3 = 1 band
    assert _bands((4, 16, 16, 4)) == 1           # BANDED_BATCH and above: no bands
    assert _bands((1, 12, 12, 4)) == 3           # bands divide the height...
    assert _bands((1, 6, 6, 4)) == 1             # ...and keep at least 4 rows each
    assert _bands((1, 16, 16, 4), stride=2) == 0  # 0: plain lax, no custom backward
    assert _bands((1, 16, 16, 4), kernel=1, padding="VALID") == 0
    assert _bands((1, 16, 16, 4), padding="VALID") == 0


@pytest.mark.parametrize("shape", [(1, 16, 16, 8), (2, 12, 12, 8), (1, 8, 8, 4), (5, 8, 8, 4),
                                   (1, 4, 4, 32), (5, 4, 4, 32), (3, 4, 6, 32)])
def test_values_and_gradients_match_lax(shape):
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], shape)
    w = jax.random.normal(keys[1], (3, 3, shape[-1], max(6, shape[-1]))) / np.sqrt(9 * shape[-1])

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, (1, 1), "SAME", dimension_numbers=_DN)))

    np.testing.assert_array_equal(
        conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN),
        lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN))
    ours = jax.grad(loss(conv.conv_general_dilated), (0, 1))(x, w)
    theirs = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    for got, want in zip(ours, theirs):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", value)
            if hasattr(sub, "eqns"):
                yield from _equations(sub)


def test_banded_gradient_stacks_bands_along_the_batch():
    """At batch 1 the kernel gradient's convolution sees 4 bands as a batch of 4."""
    x = jnp.zeros((1, 16, 16, 4))
    w = jnp.zeros((3, 3, 4, 8))
    grad = jax.grad(lambda w: jnp.sum(conv.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=_DN)))
    lhs_shapes = [eqn.invars[0].aval.shape for eqn in _equations(jax.make_jaxpr(grad)(w).jaxpr)
                  if eqn.primitive.name == "conv_general_dilated"]
    assert (4, 6, 18, 4) in lhs_shapes  # four bands of 4 rows plus their halo, padded width


def _reversed_shapes(fn, x_shape, w_shape):
    """Shapes of the arrays that the input gradient of fn reverses."""
    w = jnp.zeros(w_shape)
    grad = jax.grad(lambda x: jnp.sum(fn(x, w, (1, 1), "SAME", dimension_numbers=_DN)))
    jaxpr = jax.make_jaxpr(grad)(jnp.zeros(x_shape))
    return {eqn.invars[0].aval.shape for eqn in _equations(jaxpr.jaxpr)
            if eqn.primitive.name == "rev"}


@pytest.mark.parametrize("batch", [1, 4])
def test_input_gradient_flips_the_smaller_of_maps_and_kernel(batch):
    """XLA:CPU's copy that flips and transposes a kernel at once is slow: small maps are flipped."""
    small_maps = ((batch, 4, 4, 32), (3, 3, 32, 32))  # 16 * 64 * batch values < 9 * 32 * 32
    assert _reversed_shapes(lax.conv_general_dilated, *small_maps) == {(3, 3, 32, 32)}
    assert _reversed_shapes(conv.conv_general_dilated, *small_maps) == {(batch, 4, 4, 32)}
    large_maps = ((batch, 16, 16, 4), (3, 3, 4, 8))   # there lax's kernel flip is cheaper
    assert _reversed_shapes(conv.conv_general_dilated, *large_maps) == {(3, 3, 4, 8)}


def test_bfloat16_compute_keeps_dtypes():
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 16), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(2), (3, 3, 16, 16)) * 0.1).astype(jnp.bfloat16)
    f = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)
    out, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(jnp.ones_like(out))
    assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    ref_dw = jax.vjp(lambda w: lax.conv_general_dilated(
        x.astype(jnp.float32), w, (1, 1), "SAME", dimension_numbers=_DN),
        w.astype(jnp.float32))[1](jnp.ones(out.shape, jnp.float32))[0]
    np.testing.assert_allclose(dw.astype(jnp.float32), ref_dw, rtol=0.02, atol=0.1)


def test_unet_3x3_layers_use_it():
    rngs = nnx.Rngs(0)
    for stride in (1, 2):
        layer = conv3x3(4, 8, rngs=rngs, dtype=jnp.float32, stride=stride)
        assert layer.conv_general_dilated is conv.conv_general_dilated
