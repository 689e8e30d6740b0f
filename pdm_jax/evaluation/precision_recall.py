"""Improved precision and recall (Kynkaenniemi et al. 2019) as ADM's evaluator computes them.

Each set's manifold is the union of balls around its points whose squared radius is the squared
distance to the k-th nearest neighbour within the set (k = 3; the point itself at distance 0 is
the 0-th); precision is the fraction of samples inside the reference manifold, recall the fraction
of reference points inside the sample manifold. Distances are computed in blocks on the
accelerator in float32 at the highest matmul precision (ADM tries float16 first), so 50k x 50k
never materialises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# ADM's neighbourhood size for precision/recall.
PR_K = 3


def _sq_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """(R, C) squared Euclidean distances, clamped at 0 against round-off."""
    uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.sum(u * u, axis=1)[:, None] - 2.0 * uv + jnp.sum(v * v, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _knn_block(rows: jax.Array, col_blocks: jax.Array, col_valid: jax.Array, k: int) -> jax.Array:
    """Squared distance from each row to its k-th nearest column (0-th = nearest)."""

    def body(best, block):
        cols, valid = block
        d = jnp.where(valid[None, :], _sq_distances(rows, cols), jnp.inf)
        neg_best, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
        return -neg_best, None

    init = jnp.full((rows.shape[0], k + 1), jnp.inf, rows.dtype)
    best, _ = jax.lax.scan(body, init, (col_blocks, col_valid))
    return best[:, k]


@jax.jit
def _inside_block(rows: jax.Array, row_radii: jax.Array, col_blocks: jax.Array,
                  col_radii: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows inside some column ball (R,), columns inside some row ball (nb, C))."""

    def body(rows_in, block):
        cols, radii = block
        d = _sq_distances(rows, cols)
        rows_in = rows_in | jnp.any(d <= radii[None, :], axis=1)
        return rows_in, jnp.any(d <= row_radii[:, None], axis=0)

    rows_in, cols_in = jax.lax.scan(body, jnp.zeros(rows.shape[0], bool), (col_blocks, col_radii))
    return rows_in, cols_in


def _blocks(x: np.ndarray, block: int, fill: float) -> tuple[np.ndarray, int]:
    """Pads the first axis of x to a multiple of block with ``fill``; returns (padded, n)."""
    n = len(x)
    pad = -n % block
    padded = np.concatenate([x, np.full((pad, *x.shape[1:]), fill, x.dtype)]) if pad else x
    return padded, n


def manifold_radii(features: np.ndarray, k: int = PR_K, block: int = 4096) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour within the set.

    Args:
      features: (N, D) features, N > k.
      k: neighbourhood size (ADM: 3).
      block: rows/columns per distance block (memory is O(block^2)).

    Returns:
      (N,) float32 squared radii.
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) <= k:
        raise ValueError(f"manifold_radii needs (N, D) features with N > k={k}, got "
                         f"{features.shape}.")
    block = min(block, len(features))
    padded, n = _blocks(features, block, 0.0)
    valid = (np.arange(len(padded)) < n).reshape(-1, block)
    col_blocks = jnp.asarray(padded.reshape(-1, block, padded.shape[1]))
    radii = [np.asarray(_knn_block(jnp.asarray(padded[s:s + block]), col_blocks,
                                   jnp.asarray(valid), k))
             for s in range(0, len(padded), block)]
    return np.concatenate(radii)[:n]


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = PR_K,
                     block: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (ADM's ``compute_prec_recall``).

    Args:
      ref_features: (N1, D) reference (real) features.
      sample_features: (N2, D) generated-sample features.
      k: neighbourhood size.
      block: rows/columns per distance block.

    Returns:
      (precision, recall): fraction of samples inside the reference manifold, and of reference
      points inside the sample manifold.
    """
    ref = np.asarray(ref_features, np.float32)
    sample = np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) features of equal D, got {ref.shape} "
                         f"and {sample.shape}.")
    ref_radii = manifold_radii(ref, k, block)
    sample_radii = manifold_radii(sample, k, block)
    rb, cb = min(block, len(ref)), min(block, len(sample))
    # Padding points get radius -inf: their balls contain nothing; their own flags are dropped.
    ref_p, n_ref = _blocks(ref, rb, 0.0)
    ref_radii_p, _ = _blocks(ref_radii, rb, -np.inf)
    sample_p, n_sample = _blocks(sample, cb, 0.0)
    sample_radii_p, _ = _blocks(sample_radii, cb, -np.inf)
    col_blocks = jnp.asarray(sample_p.reshape(-1, cb, sample.shape[1]))
    col_radii = jnp.asarray(sample_radii_p.reshape(-1, cb))
    ref_in = np.zeros(len(ref_p), bool)
    sample_in = np.zeros(len(sample_p), bool)
    for s in range(0, len(ref_p), rb):
        rows_in, cols_in = _inside_block(jnp.asarray(ref_p[s:s + rb]),
                                         jnp.asarray(ref_radii_p[s:s + rb]), col_blocks, col_radii)
        ref_in[s:s + rb] = np.asarray(rows_in)
        sample_in |= np.asarray(cols_in).reshape(-1)
    return float(sample_in[:n_sample].mean()), float(ref_in[:n_ref].mean())
