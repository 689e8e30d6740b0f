"""Lossless space-to-depth "patching" and its exact inverse (SPEC section 2).

A PDM runs its U-Net on ``(B, H/P, W/P, C*P*P)`` tensors. The patched channel index is
``k = (i*P + j)*C + c`` (row offset i, column offset j, colour c): the order of TensorFlow's
``space_to_depth``. PyTorch's ``pixel_unshuffle`` uses ``(c, i, j)`` instead; weights coming from
that order must be permuted with :func:`torch_to_tf_channel_permutation`.
"""

from __future__ import annotations

import einops
import jax
import numpy as np


def check_patch_size(image_size: int, patch_size: int) -> None:
    """Raises ValueError unless ``patch_size`` is a positive divisor of ``image_size``."""
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
    if image_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} does not divide image_size={image_size}; "
            f"choose a divisor of {image_size}."
        )


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """Space-to-depth: ``(B, H, W, C) -> (B, H/P, W/P, P*P*C)`` in ``(p1 p2 c)`` channel order.

    Args:
      x: NHWC images whose height and width are divisible by ``patch_size``.
      patch_size: P; 1 is the identity.

    Returns:
      The patched tensor.
    """
    if patch_size == 1:
        return x
    _, height, width, _ = x.shape
    check_patch_size(height, patch_size)
    check_patch_size(width, patch_size)
    return einops.rearrange(x, "b (h p1) (w p2) c -> b h w (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(x: jax.Array, patch_size: int) -> jax.Array:
    """Exact inverse of :func:`patchify`: ``(B, h, w, P*P*C) -> (B, h*P, w*P, C)``.

    Args:
      x: patched NHWC tensor whose channel count is divisible by ``patch_size**2``.
      patch_size: P; 1 is the identity.

    Returns:
      The unpatched images.
    """
    if patch_size == 1:
        return x
    channels = x.shape[-1]
    if channels % (patch_size * patch_size):
        raise ValueError(
            f"Cannot unpatchify {channels} channels with patch_size={patch_size}: "
            f"expected a multiple of {patch_size * patch_size}."
        )
    return einops.rearrange(x, "b h w (p1 p2 c) -> b (h p1) (w p2) c", p1=patch_size, p2=patch_size)


def torch_to_tf_channel_permutation(patch_size: int, channels: int = 3) -> np.ndarray:
    """Index array ``perm`` with ``ours[..., k] = torch[..., perm[k]]`` for patched channels.

    PyTorch's ``pixel_unshuffle`` orders patched channels ``(c p1 p2)``; ours is ``(p1 p2 c)``.

    Args:
      patch_size: P.
      channels: colour channels C.

    Returns:
      int array of length ``P*P*C``.
    """
    p = patch_size
    i, j, c = np.meshgrid(np.arange(p), np.arange(p), np.arange(channels), indexing="ij")
    return (c * p * p + i * p + j).reshape(-1)
