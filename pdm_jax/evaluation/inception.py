"""Inception-v3 "TF-FID" (2015-12-05) in Flax NNX: the feature network of ADM's evaluator (SPEC 9).

The network (inception_net.py) is the TensorFlow graph ``classify_image_graph_def.pb`` from
``inception-2015-12-05.tgz``, the one behind TTUR's FID, pytorch-fid, clean-fid's legacy mode and
OpenAI's ``guided-diffusion/evaluations/evaluator.py``. This module adds the preprocessing, the
jitted extractor and the weight files (safetensors, flat names such as ``mixed_6.conv.kernel``).

Outputs, as ADM's evaluator reads them:
  * ``pool``: ``pool_3:0``, the 8x8 average pool of ``mixed_10`` (N, 2048).
  * ``spatial``: ``mixed_6/conv:0``, the ReLU output of the 1x1 branch of block ``mixed_6`` (the
    7th Inception block; torchvision's ``Mixed_6d.branch1x1``, NOT ``Mixed_6e``), a 17x17x192
    map of which ADM keeps channels [:7] and flattens NHWC: (N, 17*17*7 = 2023).
  * ``logits`` (only if the weight file holds ``softmax/weights``): ``pool @ W`` WITHOUT the bias,
    exactly what ADM's ``_create_softmax_graph`` feeds to the softmax for the Inception Score.

Preprocessing (``preprocess="adm"``, the default) reproduces the graph that ADM feeds at
``ExpandDims:0``: float [0, 255] -> ``ResizeBilinear`` to 299x299 with TF1 semantics
(align_corners=False AND half_pixel_centers=False: source = dst * in/out, no antialiasing) ->
``(x - 128) / 128``, a range of [-1, 0.9921875]. ``preprocess="pytorch_fid"`` is pytorch-fid's
instead: half-pixel bilinear (``F.interpolate(..., mode="bilinear", align_corners=False)``) and
``x / 127.5 - 1``. The two resizes differ by up to a few grey levels; FIDs are only comparable
within one choice.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdm_jax import io as io_lib

# InceptionV3 and its constants are part of this module's interface.
from pdm_jax.evaluation.inception_net import (INPUT_SIZE, NUM_CLASSES,  # noqa: F401
                                              SPATIAL_CHANNELS, InceptionV3)

FORMAT = "pdm_jax/inception_v3_tf_fid_2015_12_05"
PREPROCESS = ("adm", "pytorch_fid")
_HIGHEST = jax.lax.Precision.HIGHEST


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
                         f"{dtype}; convert with pdm_jax.io.to_uint8.")


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
            # Weights replicated once per mesh from host copies: every process holds them all,
            # so this also works when the mesh spans several hosts.
            mesh = sharding.mesh
            if mesh not in self._replicated:
                replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                host = jax.tree.map(np.asarray, params)
                self._replicated[mesh] = jax.device_put(host, replicated)
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


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights of the right shapes, for plumbing checks without the real file (scores
    computed with them mean nothing): He-normal kernels, unit variances, zero means and betas.

    Args:
      seed: numpy seed.

    Returns:
      {flat name: float32 array} as :func:`save_inception_weights` takes.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(False).items():
        if name.endswith("kernel"):
            value = rng.normal(size=shape) * math.sqrt(2.0 / np.prod(shape[:-1]))
        else:
            value = np.ones(shape) if name.endswith("var") else np.zeros(shape)
        weights[name] = value.astype(np.float32)
    return weights


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
    io_lib.write_atomic(path, data)


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
    if metadata.get("has_logits") != str(has_logits).lower():
        raise ValueError(f"{path!r}: metadata has_logits={metadata.get('has_logits')!r} but the "
                         f"file {'holds' if has_logits else 'lacks'} the logits layer; {hint}.")
    params = jax.tree.map(jnp.asarray, _unflatten(weights))
    return InceptionFeatureExtractor(params, has_logits=has_logits, preprocess=preprocess,
                                     source=metadata.get("source", ""))


def num_params(has_logits: bool = False) -> int:
    """Parameter count of the network (21.8 M without logits)."""
    return sum(math.prod(s) for s in expected_shapes(has_logits).values())
