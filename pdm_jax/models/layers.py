"""Building blocks of the PDM U-Net (SPEC section 3): norms, embeddings, ResBlock, attention.

Parameters are float32; ``dtype`` is the compute dtype of convolutions and dense layers (bf16 on
accelerators). Norm statistics, softmax and embeddings are computed in float32 for stability.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pdm_jax.models import conv, group_norm

# PyTorch's default weight init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), ...),
# i.e. variance 1/(3 fan_in): keep the reference's scale so training recipes transfer.
default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nnx.initializers.zeros


def conv3x3(in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype, stride: int = 1, zero_init=False):
    """A 3x3 'SAME' conv.

    At stride 2 'SAME' pads one pixel after (none before), as TF does; the PyTorch port
    reproduces this with its Conv2dSame, so both ports and ours sample the same grid.
    """
    return nnx.Conv(
        in_ch, out_ch, (3, 3), strides=stride, padding="SAME", dtype=dtype,
        kernel_init=zeros_init if zero_init else default_init,
        conv_general_dilated=conv.conv_general_dilated, rngs=rngs)


def conv1x1(in_ch: int, out_ch: int, *, rngs: nnx.Rngs, dtype, zero_init=False):
    return nnx.Conv(in_ch, out_ch, (1, 1), padding="VALID", dtype=dtype,
                    kernel_init=zeros_init if zero_init else default_init, rngs=rngs)


def dense(in_f: int, out_f: int, *, rngs: nnx.Rngs, dtype, zero_init=False):
    return nnx.Linear(in_f, out_f, dtype=dtype,
                      kernel_init=zeros_init if zero_init else default_init, rngs=rngs)


class GroupNorm(nnx.Module):
    """GroupNorm with float32 statistics and an explicit epsilon.

    Flax's default epsilon (1e-6) matches neither reference port (SPEC section 3), so it is
    always passed in. The result is cast back to the input dtype.
    """

    def __init__(self, channels: int, *, num_groups: int, eps: float, affine: bool = True):
        if channels % num_groups:
            raise ValueError(
                f"GroupNorm: channel count {channels} is not divisible by num_groups={num_groups}.")
        self.num_groups = num_groups
        self.eps = eps
        self.affine = affine
        if affine:
            self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array, scale: jax.Array | None = None,
                 shift: jax.Array | None = None) -> jax.Array:
        """Normalise x, then apply the optional per-sample modulation y * (1 + scale) + shift.

        Args:
          x: (B, H, W, C) activations.
          scale, shift: optional (B, C) per-sample modulation (the ResBlock's scale-shift norm);
            folded into the normalisation's own per-channel multiply-add.

        Returns:
          (B, H, W, C) in x's dtype.
        """
        b, h, w, c = x.shape
        # The affine weights and the modulation fold into one (B, 1, C) gain and offset, so
        # the full-size work is a single multiply-add (group_norm.py says why that matters).
        gain = jnp.ones((b, 1, c), jnp.float32)
        offset = jnp.zeros((b, 1, c), jnp.float32)
        if self.affine:
            gain = gain * self.scale[...]
            offset = offset + self.bias[...]
        if scale is not None:
            factor = 1 + scale.astype(jnp.float32)[:, None, :]
            gain, offset = gain * factor, offset * factor
        if shift is not None:
            offset = offset + shift.astype(jnp.float32)[:, None, :]
        y = group_norm.normalize(x.astype(jnp.float32).reshape(b, h * w, c), gain, offset,
                                 self.num_groups, self.eps)
        return y.reshape(b, h, w, c).astype(x.dtype)


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Ho-style timestep embedding: sin first, frequencies exp(-ln(1e4) k/(half-1)) (SPEC 3).

    Args:
      t: (B,) timesteps of the ORIGINAL 1000-step chain (also when sampling is respaced).
      dim: embedding width (model_channels).

    Returns:
      (B, dim) float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def position_embedding_2d(resolution: int, channels: int) -> jax.Array:
    """Constant 2-D sinusoidal position embedding added after the first conv (SPEC 3, step 2).

    Channels [0:half] encode the column, [half:] the row, with angular step w = 64/resolution
    so that every patch size sees the same spatial frequencies over the image.

    Args:
      resolution: the patched (square) resolution.
      channels: C_0; must be even.

    Returns:
      (resolution, resolution, channels) float32.
    """
    half = channels // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    step = 64.0 / resolution
    pos = jnp.arange(resolution, dtype=jnp.float32) * step
    col = jnp.sin(pos[None, :, None] * freqs)  # (1, W, half)
    row = jnp.sin(pos[:, None, None] * freqs)  # (H, 1, half)
    col = jnp.broadcast_to(col, (resolution, resolution, half))
    row = jnp.broadcast_to(row, (resolution, resolution, half))
    return jnp.concatenate([col, row], axis=-1)


class ResBlock(nnx.Module):
    """Scale-shift ResBlock with the PDM class gate (SPEC section 3)."""

    def __init__(self, in_ch: int, out_ch: int, *, emb_dim: int, class_dim: int | None,
                 num_groups: int, norm_eps: float, out_norm_eps: float, dropout: float,
                 dtype, rngs: nnx.Rngs):
        self.in_norm = GroupNorm(in_ch, num_groups=num_groups, eps=norm_eps)
        self.in_conv = conv3x3(in_ch, out_ch, rngs=rngs, dtype=dtype)
        self.emb_proj = dense(emb_dim, 2 * out_ch, rngs=rngs, dtype=dtype, zero_init=True)
        self.out_norm = GroupNorm(out_ch, num_groups=num_groups, eps=out_norm_eps, affine=False)
        self.out_conv = conv3x3(out_ch, out_ch, rngs=rngs, dtype=dtype, zero_init=True)
        self.class_proj = (dense(class_dim, out_ch, rngs=rngs, dtype=dtype)
                           if class_dim is not None else None)
        self.skip = conv1x1(in_ch, out_ch, rngs=rngs, dtype=dtype) if in_ch != out_ch else None
        self.dropout = dropout
        self.in_ch, self.out_ch = in_ch, out_ch

    def __call__(self, x, emb, class_emb, dropout_rng=None):
        b, hgt, wid, c = x.shape
        assert c == self.in_ch, (x.shape, self.in_ch)
        assert emb.shape[0] == b and (class_emb is None) == (self.class_proj is None)
        h = self.in_conv(jax.nn.silu(self.in_norm(x)))
        scale, shift = jnp.split(self.emb_proj(emb), 2, axis=-1)
        h = jax.nn.silu(self.out_norm(h, scale, shift))
        if self.dropout > 0 and dropout_rng is not None:
            keep = jax.random.bernoulli(dropout_rng, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(h.dtype)
        h = self.out_conv(h)
        if self.class_proj is not None:
            # +2.0 starts the gate near open (sigmoid(2) = 0.88) so an untrained gate passes h.
            gate = jax.nn.sigmoid(self.class_proj(class_emb).astype(jnp.float32) + 2.0)
            h = h * gate[:, None, None, :].astype(h.dtype)
        skip = self.skip(x) if self.skip is not None else x
        assert h.shape == skip.shape == (b, hgt, wid, self.out_ch), (h.shape, skip.shape)
        return skip + h


class Attention(nnx.Module):
    """Multi-head self-attention in guided-diffusion's "new order" (SPEC section 3).

    qkv is split into q, k, v thirds first, then each third into heads of ``head_channels``.
    Scaling q and k by ch^-1/4 each equals one 1/sqrt(ch) scale on the logits.
    """

    def __init__(self, channels: int, *, head_channels: int, num_groups: int, norm_eps: float,
                 dtype, rngs: nnx.Rngs):
        if channels % head_channels:
            raise ValueError(
                f"Attention: channels={channels} is not divisible by head_channels={head_channels}.")
        self.num_heads = channels // head_channels
        self.head_channels = head_channels
        self.norm = GroupNorm(channels, num_groups=num_groups, eps=norm_eps)
        self.qkv = conv1x1(channels, 3 * channels, rngs=rngs, dtype=dtype)
        self.proj_out = conv1x1(channels, channels, rngs=rngs, dtype=dtype, zero_init=True)

    def __call__(self, x):
        b, hgt, wid, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, hgt * wid, 3, self.num_heads, self.head_channels)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # dot_product_attention computes the softmax in float32 whatever the input dtype.
        out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.head_channels))
        assert out.shape == (b, hgt * wid, self.num_heads, self.head_channels), out.shape
        out = self.proj_out(out.reshape(b, hgt, wid, c).astype(x.dtype))
        return x + out


class Downsample(nnx.Module):
    """Stride-2 3x3 conv that also changes the width C_l -> C_{l+1} (the PDM layout)."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv3x3(in_ch, out_ch, rngs=rngs, dtype=dtype, stride=2)

    def __call__(self, x):
        b, hgt, wid, _ = x.shape
        out = self.conv(x)
        assert out.shape[:3] == (b, (hgt + 1) // 2, (wid + 1) // 2), (x.shape, out.shape)
        return out


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv C_l -> C_{l-1}."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv3x3(in_ch, out_ch, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        b, hgt, wid, _ = x.shape
        out = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        assert out.shape[:3] == (b, 2 * hgt, 2 * wid), (x.shape, out.shape)
        return out
