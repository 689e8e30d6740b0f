"""The hand-written GroupNorm (models/group_norm.py) against the textbook formula and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdm_jax.models import group_norm
from pdm_jax.models.layers import GroupNorm


def reference(x, gain, offset, num_groups, eps):
    """The textbook GroupNorm on a (B, S, G, C/G) view; JAX differentiates it."""
    b, s, c = x.shape
    xg = x.reshape(b, s, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    x_hat = ((xg - mean) / jnp.sqrt(var + eps)).reshape(b, s, c)
    return x_hat * gain + offset


def _inputs(seed, b=3, s=20, c=16, mean=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(mean, 2.0, (b, s, c)).astype(np.float32)
    gain = rng.normal(1.0, 0.5, (b, 1, c)).astype(np.float32)
    offset = rng.normal(0.0, 0.5, (b, 1, c)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(gain), jnp.asarray(offset)


@pytest.mark.parametrize("groups,mean", [(4, 0.0), (8, 30.0), (1, -5.0), (16, 0.0)])
def test_forward_and_gradients_match_the_textbook_formula(groups, mean):
    x, gain, offset = _inputs(groups, mean=mean)
    w = jnp.asarray(np.random.default_rng(9).normal(size=x.shape).astype(np.float32))

    def loss(fn):
        # A non-uniform weight w, so every term of the backward pass is exercised.
        return lambda *a: jnp.sum(w * jnp.sin(fn(*a, groups, 1e-5)))

    y = group_norm.normalize(x, gain, offset, groups, 1e-5)
    np.testing.assert_allclose(y, reference(x, gain, offset, groups, 1e-5), atol=2e-5)
    ours = jax.grad(loss(group_norm.normalize), argnums=(0, 1, 2))(x, gain, offset)
    theirs = jax.grad(loss(reference), argnums=(0, 1, 2))(x, gain, offset)
    for name, a, b in zip(("dx", "dgain", "doffset"), ours, theirs):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, atol=2e-5 * max(scale, 1.0), err_msg=name)


def test_gradient_is_wrong_if_the_backward_is_wrong():
    """The comparison above can fail: a backward that drops the mean term differs clearly."""
    x, gain, offset = _inputs(0)
    x_hat = (reference(x, gain, offset, 4, 1e-5) - offset) / gain
    ours = jax.grad(lambda x: jnp.sum(group_norm.normalize(x, gain, offset, 4, 1e-5) * x_hat))(x)
    naive = gain * x_hat  # the gradient without the statistics' dependence on x
    assert float(jnp.abs(ours - naive).max()) > 0.1


def test_module_modulation_equals_norm_then_scale_shift():
    """GroupNorm(x, scale, shift) == GroupNorm(x) * (1 + scale) + shift, values and grads."""
    rng = np.random.default_rng(1)
    norm = GroupNorm(16, num_groups=4, eps=1e-5)
    graphdef, state = nnx.split(norm)
    state = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), a.dtype),
                         state)
    x = jnp.asarray(rng.normal(size=(2, 4, 5, 16)).astype(np.float32))
    scale = jnp.asarray(rng.normal(size=(2, 16)).astype(np.float32))
    shift = jnp.asarray(rng.normal(size=(2, 16)).astype(np.float32))

    def folded(state, x, scale, shift):
        return nnx.merge(graphdef, state)(x, scale, shift)

    def unfolded(state, x, scale, shift):
        return (nnx.merge(graphdef, state)(x) * (1 + scale[:, None, None])
                + shift[:, None, None])

    np.testing.assert_allclose(folded(state, x, scale, shift), unfolded(state, x, scale, shift),
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(lambda *a: jnp.sum(folded(*a) ** 2),
                                             argnums=(0, 1, 2, 3))(state, x, scale, shift)),
                    jax.tree.leaves(jax.grad(lambda *a: jnp.sum(unfolded(*a) ** 2),
                                             argnums=(0, 1, 2, 3))(state, x, scale, shift))):
        np.testing.assert_allclose(a, b, atol=1e-4)
