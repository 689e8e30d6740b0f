"""ADM-layout .npz batches: sample/reference images and precomputed statistics.

OpenAI's reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``) hold ``arr_0`` (uint8 NHWC
reference images, 10k for ImageNet) and ``mu``/``sigma`` (pool_3) and ``mu_s``/``sigma_s``
(spatial) statistics; ADM's evaluator takes FID/sFID from the stored statistics and computes
precision/recall (and IS) features from ``arr_0``. Sample batches hold ``arr_0`` (+ ``arr_1``
labels). Reference files written by pdm_jax use the same keys plus ``pool_features`` (float32
pool_3 features of the ``arr_0`` images, so precision/recall need no Inception pass) and
``count`` (images behind mu/sigma); ADM's evaluator ignores the extra keys.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from pdm_jax import io as io_lib
from pdm_jax.evaluation import metrics

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# Images stored in a reference file (ADM's ImageNet reference batches hold 10k).
REF_IMAGES = 10_000


@dataclasses.dataclass
class BatchStats:
    """What the metrics need from one side (reference or samples) of an evaluation.

    Attributes:
      mu, sigma: pool_3 mean and covariance (FID).
      mu_s, sigma_s: spatial mean and covariance (sFID).
      pool_features: (N, 2048) features for precision/recall, or None.
      logits: (N, C) classifier logits for the Inception Score, or None.
      count: number of images behind mu/sigma (0 when a file does not say).
      logits_note: why ``logits`` is None, for the report.
    """

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool_features: np.ndarray | None = None
    logits: np.ndarray | None = None
    count: int = 0
    logits_note: str = ""

    @classmethod
    def from_feature_stats(cls, stats: metrics.FeatureStats) -> BatchStats:
        note = "" if stats.logits_sample is not None else (
            "the Inception weights have no classifier head (logits)")
        return cls(stats.pool.mean, stats.pool.sigma, stats.spatial.mean, stats.spatial.sigma,
                   stats.pool_sample, stats.logits_sample, stats.count, note)


def npz_keys(path: str) -> list[str]:
    """Array names in an .npz file (without reading the arrays).

    Raises:
      FileNotFoundError / ValueError: a missing file or one that is not an .npz archive.
    """
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        with tf.io.gfile.GFile(path, "rb") as f, zipfile.ZipFile(f) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not an .npz file: {e}") from e


def describe(path: str) -> tuple[bool, bool]:
    """(has statistics, has images) of an ADM-layout .npz; raises when it has neither."""
    keys = set(npz_keys(path))
    has_stats = set(STAT_KEYS) <= keys
    if not has_stats and keys & set(STAT_KEYS):
        raise ValueError(f"{path} has only {sorted(keys & set(STAT_KEYS))} of the statistics "
                         f"{list(STAT_KEYS)}.")
    if not has_stats and "arr_0" not in keys:
        raise ValueError(f"{path} holds neither images (arr_0) nor statistics "
                         f"{list(STAT_KEYS)}; its arrays: {sorted(keys)}.")
    return has_stats, "arr_0" in keys


def _read_header(member, path: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream positioned at its start."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"{path}: unsupported .npy format version {version} for arr_0.")


def iter_images(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """Streams ``arr_0`` of an .npz in batches without loading the whole array.

    Args:
      path: .npz with ``arr_0`` uint8 (N, H, W, 3).
      batch_size: images per yielded batch (the last may be shorter).

    Yields:
      uint8 (b, H, W, 3) batches in file order.
    """
    with tf.io.gfile.GFile(path, "rb") as f, zipfile.ZipFile(f) as z:
        with z.open("arr_0.npy") as member:
            shape, fortran, dtype = _read_header(member, path)
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}: arr_0 must be a C-ordered numeric array.")
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got "
                                 f"{dtype} {shape}.")
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = member.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(f"{path}: arr_0 is truncated at image {start}.")
                yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def num_images(path: str) -> int:
    """Length of ``arr_0`` (read from the header only)."""
    with tf.io.gfile.GFile(path, "rb") as f, zipfile.ZipFile(f) as z:
        with z.open("arr_0.npy") as member:
            shape, _, _ = _read_header(member, path)
    return int(shape[0])


def load_stats(path: str) -> BatchStats:
    """The stored statistics of an .npz (and its ``pool_features`` if present)."""
    with tf.io.gfile.GFile(path, "rb") as f, np.load(f) as data:  # Reads only these members.
        missing = [k for k in STAT_KEYS if k not in data]
        if missing:
            raise ValueError(f"{path} lacks the statistics {missing}.")
        return BatchStats(
            *(np.asarray(data[k], np.float64) for k in STAT_KEYS),
            pool_features=np.asarray(data["pool_features"], np.float32)
            if "pool_features" in data else None,
            count=int(data["count"]) if "count" in data else 0,
            logits_note="the file holds statistics, not images, so there are no logits")


def save_reference(path: str, stats: metrics.FeatureStats, images: np.ndarray | None) -> None:
    """Writes a reference batch in ADM's layout (+ pool_features, count), atomically.

    Args:
      path: destination .npz (local or gs://).
      stats: accumulated statistics; its ``pool_sample`` becomes ``pool_features``.
      images: uint8 NHWC images whose features are ``pool_sample`` (``arr_0``), or None to
        write statistics only (ADM's evaluator then cannot compute precision/recall from it).
    """
    arrays = {"mu": stats.pool.mean, "sigma": stats.pool.sigma, "mu_s": stats.spatial.mean,
              "sigma_s": stats.spatial.sigma, "pool_features": stats.pool_sample,
              "count": np.asarray(stats.count, np.int64)}
    if images is not None:
        if len(images) != len(stats.pool_sample):
            raise ValueError(f"{len(images)} images but {len(stats.pool_sample)} features.")
        arrays["arr_0"] = images
    io_lib.save_npz(path, arrays)
