"""The U-Net's convolution: ``lax.conv_general_dilated``, with the backward pass of 3x3 layers
re-formed for XLA:CPU.

Two XLA:CPU behaviours cost the backward pass of a 3x3, stride-1 'SAME' layer more than its
arithmetic (jax 0.10, 2-core AMD EPYC, float32; benchmarks/RESULTS.md):

* Input gradient. jax forms it as a convolution of the output gradient with the kernel
  flipped in space, its in / out axes swapped. XLA:CPU materialises that kernel in one copy
  that both reverses and transposes it, and that copy runs far slower than a plain transpose
  (6.5 ms for a 3x3, 1024 -> 512 kernel, against 1.0 ms for the transpose alone), every step.
  With 'SAME' padding of one pixel on each side, flipping the kernel in space equals flipping
  the gradient map before the convolution and the result after it, so where the maps hold
  fewer values than the kernel (the deep, small-map layers) the maps are flipped instead and
  the kernel only transposed: 8.6 -> 2.9 ms for that layer at 8x8, batch 1. Where the maps are
  larger, flipping them costs more than the kernel copy saves (64x64, 512 -> 256, batch 4:
  98.7 -> 105.2 ms), and lax's form is kept.
* Kernel gradient at small batches. XLA forms it as a convolution whose window is the whole
  feature map and whose contracted "feature" axis is the batch. At batch 1 that axis has length
  one, and XLA:CPU's kernels run far below their speed (39 ms for a 3x3, 512 -> 256 layer at
  64x64, where oneDNN takes 22). Cutting the map into horizontal bands (each with its one-row
  halo) and stacking the bands along the batch axis gives the same sum with a longer batch
  axis: 25 ms there.

The forward pass is XLA's own. Only the CPU backend and 3x3 stride-1 'SAME' convolutions in
NHWC / HWIO take this path; everything else goes straight to ``lax.conv_general_dilated``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Batches of at least this size already fill the kernel-gradient convolution (no gain at 4).
BANDED_BATCH = 4

_NHWC = ("NHWC", "HWIO", "NHWC")
# The input gradient's convolution reads the kernel with in / out swapped, without a copy.
_NHWC_SWAPPED = ("NHWC", "HWOI", "NHWC")
_SAME = ((1, 1), (1, 1))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None,
                         **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments), with a faster CPU backward for 3x3 layers.

    Args:
      lhs, rhs: input and kernel.
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type, kwargs:
        as for ``lax.conv_general_dilated``.

    Returns:
      The convolution (the same value; its gradients equal up to float rounding).
    """
    bands = _band_count(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count, kwargs)
    if bands:
        return _cpu_conv3x3(lhs, rhs, (bands, _flips_maps(lhs.shape, rhs.shape)), precision,
                            preferred_element_type)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type, **kwargs)


def _band_count(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count, kwargs) -> int:
    """Row bands of the kernel gradient: 0 for the plain lax path, 1 for no bands."""
    if (jax.default_backend() != "cpu" or lhs.ndim != 4 or rhs.shape[:2] != (3, 3)
            or any(v is not None for v in kwargs.values())
            or feature_group_count != 1 or batch_group_count != 1
            or tuple(window_strides) != (1, 1)
            or any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation))
            or dimension_numbers is None
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
        return 0
    pads = (lax.padtype_to_pads(lhs.shape[1:3], (3, 3), (1, 1), padding)
            if isinstance(padding, str) else [tuple(p) for p in padding])
    if pads != list(_SAME):
        return 0
    batch, height = lhs.shape[:2]
    bands = max(BANDED_BATCH // batch, 1)
    while bands > 1 and (height % bands or height // bands < 4):
        bands -= 1
    return bands


def _flips_maps(input_shape, kernel_shape) -> bool:
    """Whether the input gradient flips the maps (fewer values than the kernel) or the kernel."""
    batch, height, width, in_channels = input_shape
    out_channels = kernel_shape[-1]
    return batch * height * width * (in_channels + out_channels) <= 9 * in_channels * out_channels


def _lax_conv3x3(x, w, padding, precision, preferred_element_type, dims=_NHWC):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dims,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv3x3(x, w, plan, precision, preferred_element_type):
    """3x3 stride-1 'SAME' convolution with the re-formed backward pass of the module docstring.

    ``plan`` is (row bands of the kernel gradient, whether the input gradient flips the maps).
    """
    del plan
    return _lax_conv3x3(x, w, _SAME, precision, preferred_element_type)


def _cpu_conv3x3_fwd(x, w, plan, precision, preferred_element_type):
    return _cpu_conv3x3(x, w, plan, precision, preferred_element_type), (x, w)


def _cpu_conv3x3_bwd(plan, precision, preferred_element_type, residuals, dy):
    x, w = residuals
    bands, flip_maps = plan
    dx = _input_gradient(x, w, dy, flip_maps, precision, preferred_element_type)
    dw = _kernel_gradient(x, w, dy, bands, precision, preferred_element_type)
    return dx.astype(x.dtype), dw.astype(w.dtype)


def _input_gradient(x, w, dy, flip_maps, precision, preferred_element_type):
    """dx[p] = sum over taps t of dy[p - t] w[t]^T, flipping the maps or (lax) the kernel."""
    if not flip_maps:
        return _transpose(lambda v: _lax_conv3x3(v, w, _SAME, precision, preferred_element_type),
                          x, dy)
    flipped = _lax_conv3x3(dy[:, ::-1, ::-1], w.astype(dy.dtype), _SAME, precision,
                           preferred_element_type, dims=_NHWC_SWAPPED)
    return flipped[:, ::-1, ::-1]


def _kernel_gradient(x, w, dy, bands, precision, preferred_element_type):
    if bands == 1:
        return _transpose(lambda k: _lax_conv3x3(x, k, _SAME, precision, preferred_element_type),
                          w, dy)
    # Band b covers output rows [b*r, (b+1)*r), which read padded input rows [b*r, b*r + r + 2):
    # a 'VALID' convolution of each padded band gives exactly that band's outputs.
    rows = x.shape[1] // bands
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x_bands = jnp.concatenate([padded[:, b * rows:b * rows + rows + 2] for b in range(bands)])
    dy_bands = jnp.concatenate([dy[:, b * rows:(b + 1) * rows] for b in range(bands)])
    return _transpose(
        lambda k: _lax_conv3x3(x_bands, k, "VALID", precision, preferred_element_type),
        w, dy_bands)


def _transpose(linear_fn, primal, cotangent):
    """The transpose of linear_fn at cotangent: a gradient without tracing a forward pass."""
    return jax.linear_transpose(linear_fn, primal)(cotangent)[0]


_cpu_conv3x3.defvjp(_cpu_conv3x3_fwd, _cpu_conv3x3_bwd)
