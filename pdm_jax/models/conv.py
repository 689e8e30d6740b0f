"""The U-Net's convolution: ``lax.conv_general_dilated``, with the small-batch kernel gradient
of 3x3 layers re-formed for XLA:CPU.

XLA forms a convolution's kernel gradient as another convolution whose window is the whole
feature map and whose contracted "feature" axis is the batch. At batch 1 that axis has length
one, and XLA:CPU's kernels run it far below their speed (jax 0.10, 2-core AMD EPYC, float32:
39 ms for a 3x3, 512 -> 256 layer at 64x64, where oneDNN takes 22). Cutting the map into
horizontal bands (each with its one-row halo) and stacking the bands along the batch axis
gives the same sum with a longer batch axis: 25 ms there (benchmarks/RESULTS.md, "Kernel
gradients at small batches"). Forward and input gradient are XLA's own. Only the CPU backend,
3x3 stride-1 'SAME' convolutions in NHWC / HWIO and batches below ``BANDED_BATCH`` take this
path; everything else goes straight to ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Batches of at least this size already fill the kernel-gradient convolution (no gain at 4).
BANDED_BATCH = 4

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None,
                         **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments), with a faster small-batch kernel gradient.

    Args:
      lhs, rhs: input and kernel.
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type, kwargs:
        as for ``lax.conv_general_dilated``.

    Returns:
      The convolution (the same value; its kernel gradient equal up to float rounding).
    """
    bands = _band_count(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count, kwargs)
    if bands > 1:
        return _banded_conv3x3(lhs, rhs, bands, precision, preferred_element_type)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type, **kwargs)


def _band_count(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count, kwargs) -> int:
    """How many row bands the kernel gradient uses (1: the plain lax path)."""
    if (jax.default_backend() != "cpu" or lhs.ndim != 4 or rhs.shape[:2] != (3, 3)
            or any(v is not None for v in kwargs.values())
            or feature_group_count != 1 or batch_group_count != 1
            or tuple(window_strides) != (1, 1)
            or any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation))
            or dimension_numbers is None
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return 1
    pads = (lax.padtype_to_pads(lhs.shape[1:3], (3, 3), (1, 1), padding)
            if isinstance(padding, str) else [tuple(p) for p in padding])
    batch, height = lhs.shape[:2]
    if pads != [(1, 1), (1, 1)] or batch >= BANDED_BATCH:
        return 1
    bands = BANDED_BATCH // batch
    while bands > 1 and (height % bands or height // bands < 4):
        bands -= 1
    return bands


def _lax_conv3x3(x, w, padding, precision, preferred_element_type):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _banded_conv3x3(x, w, bands, precision, preferred_element_type):
    """3x3 stride-1 'SAME' convolution whose kernel gradient stacks row bands along the batch."""
    return _lax_conv3x3(x, w, ((1, 1), (1, 1)), precision, preferred_element_type)


def _banded_fwd(x, w, bands, precision, preferred_element_type):
    del bands
    return _lax_conv3x3(x, w, ((1, 1), (1, 1)), precision, preferred_element_type), (x, w)


def _banded_bwd(bands, precision, preferred_element_type, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(
        lambda v: _lax_conv3x3(v, w, ((1, 1), (1, 1)), precision, preferred_element_type), x)
    (dx,) = input_vjp(dy)
    # Band b covers output rows [b*r, (b+1)*r), which read padded input rows [b*r, b*r + r + 2):
    # a 'VALID' convolution of each padded band gives exactly that band's outputs.
    rows = x.shape[1] // bands
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x_bands = jnp.concatenate([padded[:, b * rows:b * rows + rows + 2] for b in range(bands)])
    dy_bands = jnp.concatenate([dy[:, b * rows:(b + 1) * rows] for b in range(bands)])
    _, kernel_vjp = jax.vjp(
        lambda k: _lax_conv3x3(x_bands, k, "VALID", precision, preferred_element_type), w)
    (dw,) = kernel_vjp(dy_bands)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_banded_conv3x3.defvjp(_banded_fwd, _banded_bwd)
