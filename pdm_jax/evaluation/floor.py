"""A model's FID next to its data's own floor: distinct data images, the floor, scoring EMAs.

FID is biased upwards at small sample counts N, so a model's FID means little alone. The floor
is what a perfect model would score at N: the metrics of N other data images against the N
reference images, through the same evaluator (Inception features on the mesh, ADM's metrics).
Used by ``benchmarks/demo_fid.py`` (one trained run) and ``benchmarks/paper_claims.py`` (many
runs against one reference).

  images, labels = distinct_images(config.data, seed=0, limit=2 * num)
  ref = data_floor(images, num, inception_path, mesh, 64, ref_path="/tmp/ref.npz",
                   labels=labels)
  score = reference_scorer(config, mesh, ref, steps="50", batch_size=64)
  metrics = score(emas)   # next to ref.floor
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from pdm_jax.evaluation import features, inception, metrics, npz_stats, report

# The metrics a floor and a model are compared on (report.compute_metrics also has IS, notes).
METRIC_KEYS = ("fid", "sfid", "precision", "recall")


def distinct_images(data_config: Any, seed: int, limit: int,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` distinct images of a data section, read once without flips.

    The images come through the training pipeline (crop, resize to ``data_config.image_size``)
    in its shuffled order for ``seed``; exact repeats are dropped (an epoch boundary inside a
    batch repeats images), and reading stops at ``limit`` or when a whole batch brings nothing
    new (the data is exhausted).

    Args:
      data_config: a run config's data section (ConfigDict or dict).
      seed: shuffling seed of the pipeline.
      limit: most images returned.
      batch_size: images read per pipeline batch.

    Returns:
      (uint8 NHWC images, int32 labels; 0 for every image unless ``class_conditional``).
    """
    from pdm_jax import io as io_lib
    from pdm_jax.data import pipeline

    data = dict(getattr(data_config, "to_dict", lambda: data_config)(), random_flip=False)
    # stdout is for results only: tfds prints "Downloading and preparing dataset ..." there
    # when it builds the demo set on first use.
    with contextlib.redirect_stdout(sys.stderr):
        stream = pipeline.iterate_numpy(pipeline.make_train_dataset(
            data, global_batch_size=batch_size, seed=seed, process_index=0, process_count=1))
        images, labels, seen = [], [], set()
        while len(images) < limit:
            batch, new = next(stream), 0
            for image, label in zip(io_lib.data_to_uint8(batch["image"]), batch["label"]):
                key = hashlib.sha1(image.tobytes()).digest()
                if key not in seen and len(images) < limit:
                    seen.add(key)
                    images.append(image)
                    labels.append(label)
                    new += 1
            if not new:  # a whole batch of repeats: the epoch is exhausted
                break
    return np.stack(images), np.asarray(labels, np.int32)


@dataclasses.dataclass
class Reference:
    """N reference images' statistics and the data's own floor against them.

    Attributes:
      num: N, the reference (and floor) sample count.
      path: .npz holding the reference images (``arr_0``) with their statistics and pool
        features, so scoring does not run Inception over them again; '' if not written.
      inception_path: the Inception weights every side was (and must be) computed with.
      stats: the reference's statistics.
      floor: METRIC_KEYS of N other data images against the reference.
      extractor: the loaded Inception extractor (reused for more sides).
      feature_fn: its jitted feature function on the mesh.
      labels: the reference images' classes (None: unconditional); models are sampled with
        them, so their samples follow the data's class frequencies, as the floor's half does.
    """

    num: int
    path: str
    inception_path: str
    stats: npz_stats.BatchStats
    floor: dict[str, float]
    extractor: Any
    feature_fn: features.FeatureFn
    labels: np.ndarray | None = None


def image_stats(images: np.ndarray, extractor: Any, feature_fn: features.FeatureFn, mesh: Mesh,
                batch_size: int) -> tuple[npz_stats.BatchStats, metrics.FeatureStats]:
    """Inception statistics of uint8 NHWC images (all rows kept for precision/recall).

    Args:
      images: uint8 (N, H, W, 3), N >= 2.
      extractor: Inception extractor.
      feature_fn: ``features.make_feature_fn(extractor, mesh)``.
      mesh: device mesh.
      batch_size: images per Inception batch (divisible by the device count).

    Returns:
      (statistics for ``report.compute_metrics``, the raw accumulated statistics).
    """
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    stats, _ = features.accumulate_host_batches(
        feature_fn, batches, features.empty_stats(extractor, max_sample=len(images)), mesh,
        batch_size)
    return npz_stats.BatchStats.from_feature_stats(stats), stats


def data_floor(images: np.ndarray, num: int, inception_path: str, mesh: Mesh, batch_size: int,
               ref_path: str = "", labels: np.ndarray | None = None) -> Reference:
    """Reference statistics of ``images[:num]`` and the floor of ``images[num:2 num]``.

    Args:
      images: uint8 NHWC distinct data images (:func:`distinct_images`), at least 2 x num.
      num: N, the sample count every model will be scored at.
      inception_path: Inception weights (``python -m pdm_jax.cli.convert_inception``).
      mesh: device mesh for Inception.
      batch_size: images per Inception batch (divisible by the device count).
      ref_path: where to write the reference .npz for :func:`reference_scorer` ('' = nowhere).
      labels: the images' classes, for class-conditional data (None: unconditional).

    Returns:
      The :class:`Reference`.

    Raises:
      ValueError: fewer than 2 x num images (the floor needs two disjoint halves).
    """
    if num < 2 or 2 * num > len(images):
        raise ValueError(f"num={num}: the floor needs 2 <= num and 2 x num distinct images; "
                         f"the data holds {len(images)}.")
    extractor = inception.load_inception(inception_path)
    feature_fn = features.make_feature_fn(extractor, mesh)
    reference, raw = image_stats(images[:num], extractor, feature_fn, mesh, batch_size)
    other, _ = image_stats(images[num:2 * num], extractor, feature_fn, mesh, batch_size)
    floor = report.compute_metrics(reference, other)
    if ref_path:
        npz_stats.save_reference(ref_path, raw, images[:num])
    return Reference(num=num, path=ref_path, inception_path=inception_path, stats=reference,
                     floor={k: floor[k] for k in METRIC_KEYS}, extractor=extractor,
                     labels=None if labels is None else np.asarray(labels[:num], np.int32),
                     feature_fn=feature_fn)


def images_metrics(ref: Reference, images: np.ndarray, mesh: Mesh,
                   batch_size: int) -> dict[str, float]:
    """METRIC_KEYS of any uint8 images (e.g. a noise baseline) against the reference."""
    stats, _ = image_stats(images, ref.extractor, ref.feature_fn, mesh, batch_size)
    result = report.compute_metrics(ref.stats, stats)
    return {k: result[k] for k in METRIC_KEYS}


def reference_scorer(config: ml_collections.ConfigDict, mesh: Mesh, ref: Reference, *,
                     steps: str, batch_size: int) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """The project's scorer (``scorer.make_scorer``) against the reference, at the floor's N.

    ``score(emas)`` samples ``ref.num`` images with the config's sample section (sampler, eta,
    guidance, seed) and respacing ``steps`` (a class-conditional model with the reference's
    labels), and scores them against the reference written by :func:`data_floor`. Models
    whose sampling program is the same (same experts' U-Nets, parameterisation and sample
    section) can share one scorer and its compiled sampler.

    Args:
      config: run config of the model (its eval section is not modified).
      mesh: device mesh.
      ref: the reference; ``ref.path`` must be set.
      steps: respacing string of the sampler.
      batch_size: images per sampling (and Inception) batch, divisible by the device count.

    Returns:
      ``score(emas)``: each expert's EMA parameters in config order -> ``make_scorer``'s dict
      (``report.compute_metrics``' plus the sampling settings).
    """
    from pdm_jax.evaluation import scorer

    if not ref.path:
        raise ValueError("reference_scorer needs a Reference written to a file (data_floor "
                         "ref_path).")
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.update(inception_path=ref.inception_path, ref_path=ref.path,
                       num_samples=ref.num, batch_size=batch_size)
    num_classes = config.model.num_classes if config.data.class_conditional else 0
    labels = ref.labels if num_classes and ref.labels is not None else None
    return scorer.make_scorer(config, mesh, num_samples=ref.num, steps=steps, labels=labels)
