"""Group normalisation with a hand-written backward pass, shaped for XLA:CPU (and fine elsewhere).

The maths is the textbook one (SPEC section 3: statistics over each sample's group of channels
and all pixels, in float32). What is written by hand is the order of operations, because the
one autodiff derives is slow on XLA:CPU: it reduces over a (B, H, W, G, C/G) view, and its
per-channel sums of products at batch 1 (sum over pixels of dy * x_hat) become reduce fusions
that ran 15 ms for one 64x64x256 activation where a dot_general over the same axes takes
0.4 ms (jax 0.10, 2-core AMD EPYC; benchmarks/RESULTS.md, "CPU speed"). Here the backward needs
two per-channel sums over pixels, and everything at full size is one fused elementwise pass
with (B, 1, C) vectors.

Forward, for x of shape (B, S, C) (S pixels) and G groups of C/G channels:
  x_hat = (x - mean_g) * rsqrt(var_g + eps),   y = x_hat * gain + offset
with gain and offset (B, 1, C): the affine weights folded with any per-sample modulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _pixel_sum(a: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """(B, S, C) -> (B, 1, C): sum over pixels of a (or of a * b)."""
    if b is None:
        out = a.sum(axis=1)
    elif a.shape[0] > 1:
        out = (a * b).sum(axis=1)
    else:  # batch 1: XLA:CPU's fused multiply-reduce is ~30x slower than a dot_general here
        out = jnp.einsum("bsc,bsc->bc", a, b, precision=jax.lax.Precision.HIGHEST)
    return out[:, None, :]


def _group_mean(channel_sums: jax.Array, num_groups: int, count: int) -> jax.Array:
    """(B, 1, C) per-channel sums -> (B, 1, C): each channel's group total / count."""
    b, _, c = channel_sums.shape
    groups = channel_sums.reshape(b, num_groups, c // num_groups).sum(-1) / count
    return jnp.repeat(groups, c // num_groups, axis=-1)[:, None, :]


def _statistics(x: jax.Array, num_groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Per-channel (B, 1, C) group mean and rsqrt(var + eps); two passes for an exact var."""
    count = x.shape[1] * (x.shape[2] // num_groups)
    mean = _group_mean(_pixel_sum(x), num_groups, count)
    centred = x - mean
    var = _group_mean(_pixel_sum(centred, centred), num_groups, count)
    return mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x: jax.Array, gain: jax.Array, offset: jax.Array, num_groups: int,
              eps: float) -> jax.Array:
    """Group-normalises x and applies a per-sample, per-channel affine map.

    Args:
      x: (B, S, C) float32 activations (S pixels).
      gain, offset: (B, 1, C) float32; y = x_hat * gain + offset.
      num_groups: G; must divide C.
      eps: added to the group variance.

    Returns:
      (B, S, C) float32.
    """
    return _normalize_fwd(x, gain, offset, num_groups, eps)[0]


def _normalize_fwd(x, gain, offset, num_groups, eps):
    mean, inv = _statistics(x, num_groups, eps)
    return (x - mean) * (inv * gain) + offset, (x, mean, inv, gain)


def _normalize_bwd(num_groups, eps, residuals, dy):
    del eps
    x, mean, inv, gain = residuals
    count = x.shape[1] * (x.shape[2] // num_groups)
    x_hat = (x - mean) * inv
    d_offset = _pixel_sum(dy)
    d_gain = _pixel_sum(dy, x_hat)
    # With g = dy * gain (the gradient at x_hat), dx = inv * (g - mean_group(g)
    # - x_hat * mean_group(g * x_hat)); both group means come from the two sums above.
    mean_g = _group_mean(gain * d_offset, num_groups, count)
    mean_gx = _group_mean(gain * d_gain, num_groups, count)
    dx = inv * (dy * gain - mean_g - x_hat * mean_gx)
    return dx, d_gain, d_offset


normalize.defvjp(_normalize_fwd, _normalize_bwd)
