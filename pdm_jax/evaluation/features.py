"""Inception features of image batches on a device mesh, folded into streaming statistics.

One jitted program per (batch shape, dtype): images arrive batch-sharded over the mesh (host
batches are padded to a fixed size so the last batch does not recompile), the Inception network
runs with replicated parameters, and each process folds only its own rows into its
:class:`~pdm_jax.evaluation.metrics.FeatureStats`; processes then merge statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pdm_jax import sharding
from pdm_jax.evaluation import metrics

FeatureFn = Callable[[jax.Array], dict[str, jax.Array]]


def make_feature_fn(extractor: Any, mesh: Mesh) -> FeatureFn:
    """A jitted ``fn(images) -> {'pool', 'spatial'[, 'logits']}``, batch-sharded in and out.

    Args:
      extractor: an ``InceptionFeatureExtractor`` (``params`` and pure ``apply``).
      mesh: device mesh; images are split over its ('data', 'fsdp') axes.

    Returns:
      The function. ``images`` are uint8 NHWC in [0, 255], or floats in [-1, 1] (sampler
      output), which become uint8 first exactly as saved samples do (``io.to_uint8``: ADM's
      truncation), so in-memory and on-disk samples give the same features.
    """
    params = jax.device_put(extractor.params, sharding.replicated(mesh))
    batch = sharding.batch_sharding(mesh)

    def features(params, images):
        if images.dtype != jnp.uint8:
            images = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0, 255)
            images = images.astype(jnp.uint8)  # truncates, as io.to_uint8
        return extractor.apply(params, images)

    fn = jax.jit(features, out_shardings=batch)
    return lambda images: fn(params, images)


def empty_stats(extractor: Any, max_sample: int) -> metrics.FeatureStats:
    """FeatureStats sized by the extractor's outputs (shapes traced, nothing computed)."""
    shapes = jax.eval_shape(extractor.apply, extractor.params,
                            jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8))
    logits = shapes.get("logits")
    return metrics.FeatureStats.empty(max_sample, shapes["pool"].shape[-1],
                                      shapes["spatial"].shape[-1],
                                      None if logits is None else logits.shape[-1])


def local_rows(features: dict[str, jax.Array],
               limit: int | None = None) -> dict[str, np.ndarray]:
    """This process's rows of batch-sharded arrays, in global order, as numpy.

    Args:
      features: arrays whose first axis is sharded (each row on one device, or replicated).
      limit: keep only rows whose global index is below this (a partly used last batch).

    Returns:
      The same keys with (n_local, ...) float32/… arrays.
    """
    out = {}
    for name, array in features.items():
        shards = {}
        for shard in array.addressable_shards:
            start = shard.index[0].start or 0
            shards.setdefault(start, shard.data)  # Replicated copies: keep one.
        rows = []
        for start in sorted(shards):
            data = np.asarray(shards[start]).reshape(shards[start].shape[0], -1)
            if limit is not None:
                data = data[:max(0, limit - start)]
            rows.append(data)
        out[name] = np.concatenate(rows)
    return out


def accumulate_host_batches(feature_fn: FeatureFn, batches: Iterable[np.ndarray],
                            stats: metrics.FeatureStats, mesh: Mesh, batch_size: int,
                            keep_images: int = 0) -> tuple[metrics.FeatureStats, np.ndarray]:
    """Folds this process's host image batches into ``stats``.

    Every process calls it with its own images and the same number of batches (a collective per
    batch when there are several processes).

    Args:
      feature_fn: from ``make_feature_fn``.
      batches: uint8 (b, H, W, 3) arrays with b <= batch_size; all of one H, W.
      stats: statistics to extend.
      mesh: the mesh ``feature_fn`` was made for.
      batch_size: this process's batch size; shorter batches are zero-padded to it and the
        padding's features dropped (one compiled program for every batch).
      keep_images: also return the first this many images (for a reference file's ``arr_0``).

    Returns:
      (stats, kept uint8 images).
    """
    kept: list[np.ndarray] = []
    n_kept = 0
    for images in batches:
        n = len(images)
        if n > batch_size:
            raise ValueError(f"A batch of {n} images exceeds batch_size={batch_size}.")
        if n_kept < keep_images:
            kept.append(images[:keep_images - n_kept])
            n_kept += len(kept[-1])
        padded = np.zeros((batch_size, *images.shape[1:]), np.uint8)
        padded[:n] = images
        out = feature_fn(sharding.global_batch({"images": padded}, mesh)["images"])
        rows = local_rows(out)
        stats = stats.update({k: v[:n] for k, v in rows.items()})
    kept_images = np.concatenate(kept) if kept else np.zeros((0, 0, 0, 3), np.uint8)
    return stats, kept_images
