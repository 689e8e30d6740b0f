"""The exact optimal denoiser of an empirical distribution, and a patch-blur measure (SPEC 1).

For data x_1..x_N and z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, the MMSE denoiser is

  E[x | z_t] = sum_i w_i x_i,   w = softmax_i( log N(z_t; sqrt(abar_t) x_i, (1 - abar_t) I) ).

PDM's premise is that this is blurry for most t, so a network that predicts it at 1/P of the
resolution (a PxP patched U-Net) loses little. ``blur_rmse`` measures exactly that: the RMS of
what PxP average pooling (then nearest upsampling) removes.

The sum over data is a ``lax.scan`` over chunks with a streaming log-sum-exp (running max,
rescaled running sums), so memory is O(queries x (chunk + pixels)) whatever N is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check(data_shape: tuple[int, ...], query_shape: tuple[int, ...], chunk_size: int) -> None:
    if len(data_shape) < 2 or data_shape[0] < 1:
        raise ValueError(f"data must be (N, ...) with N >= 1, got shape {data_shape}.")
    if tuple(query_shape[1:]) != tuple(data_shape[1:]):
        raise ValueError(f"queries {query_shape} and data {data_shape} differ in the shape of "
                         f"one example.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _denoise(data: jax.Array, valid: jax.Array, z: jax.Array, abar: jax.Array,
             chunk_size: int) -> jax.Array:
    n_pad, dim = data.shape
    chunks = data.reshape(n_pad // chunk_size, chunk_size, dim)
    valid = valid.reshape(n_pad // chunk_size, chunk_size)
    scale, var = jnp.sqrt(abar), 1.0 - abar
    # log N(z; a x_i, s2 I) = -(|z|^2 - 2a z.x_i + a^2 |x_i|^2) / (2 s2) + const; |z|^2 and the
    # constant are the same for every i and cancel in the softmax.
    hi = jax.lax.Precision.HIGHEST

    def body(carry, inputs):
        running_max, total, acc = carry
        x, ok = inputs
        logits = (scale * jnp.dot(z, x.T, precision=hi)
                  - 0.5 * abar * jnp.sum(x * x, axis=1)[None, :]) / var
        logits = jnp.where(ok[None, :], logits, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        # exp(-inf - finite) = 0; running_max starts at -inf only before the first valid chunk,
        # where total and acc are 0, so the rescale factor may be anything finite: use 0.
        rescale = jnp.where(jnp.isfinite(running_max), jnp.exp(running_max - new_max), 0.0)
        weights = jnp.exp(logits - new_max[:, None])
        total = total * rescale + jnp.sum(weights, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(weights, x, precision=hi)
        return (new_max, total, acc), None

    batch = z.shape[0]
    init = (jnp.full((batch,), -jnp.inf, z.dtype), jnp.zeros((batch,), z.dtype),
            jnp.zeros((batch, dim), z.dtype))
    (_, total, acc), _ = jax.lax.scan(body, init, (chunks, valid))
    return acc / total[:, None]


def optimal_denoiser(data: jax.Array | np.ndarray, z: jax.Array | np.ndarray, abar: float,
                     chunk_size: int = 256) -> jax.Array:
    """E[x | z_t] under the empirical distribution of ``data`` (exact, streaming over data).

    Args:
      data: (N, ...) the data set, e.g. images (N, H, W, C) in [-1, 1].
      z: (B, ...) noisy queries z_t, same example shape as data.
      abar: alpha-bar of step t, in (0, 1).
      chunk_size: data examples per scan step (memory is O(B x (chunk_size + pixels))).

    Returns:
      (B, ...) float32 posterior means (float64 if JAX x64 mode is on and inputs are float64).

    Raises:
      ValueError: shapes that disagree, abar outside (0, 1) or chunk_size < 1.
    """
    data, z = jnp.asarray(data), jnp.asarray(z)
    _check(data.shape, z.shape, chunk_size)
    if not 0.0 < float(abar) < 1.0:
        raise ValueError(f"abar must lie in (0, 1), got {abar}.")
    dtype = jnp.result_type(data.dtype, z.dtype, jnp.float32)
    n = data.shape[0]
    chunk_size = min(chunk_size, n)
    flat = data.reshape(n, -1).astype(dtype)
    pad = (-n) % chunk_size
    flat = jnp.pad(flat, ((0, pad), (0, 0)))
    valid = jnp.arange(n + pad) < n
    out = _denoise(flat, valid, z.reshape(z.shape[0], -1).astype(dtype),
                   jnp.asarray(abar, dtype), chunk_size)
    return out.reshape(z.shape)


def patch_blur(images: jax.Array, patch_size: int) -> jax.Array:
    """PxP average pooling followed by nearest upsampling back to the input size.

    Args:
      images: (B, H, W, C) with H and W divisible by patch_size.
      patch_size: P >= 1 (1 returns the input).

    Returns:
      Same shape: every PxP block replaced by its mean.
    """
    b, h, w, c = images.shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size={patch_size} must be >= 1 and divide the image size "
                         f"{h}x{w}.")
    p = patch_size
    blocks = images.reshape(b, h // p, p, w // p, p, c)
    means = jnp.mean(blocks, axis=(2, 4), keepdims=True)
    return jnp.broadcast_to(means, blocks.shape).reshape(images.shape)


def blur_rmse(images: jax.Array, patch_size: int) -> jax.Array:
    """Root mean square of ``images - patch_blur(images, P)`` over every pixel of the batch.

    0 exactly for P=1 and for images constant on PxP blocks; it is the detail a PxP patched
    network must recover inside each patch.
    """
    images = jnp.asarray(images)
    return jnp.sqrt(jnp.mean((images - patch_blur(images, patch_size)) ** 2))
