"""ADM's evaluator, as a library: statistics of .npz sides and the metrics between them.

Like guided-diffusion/evaluations/evaluator.py (SPEC 9): each file is an image batch (``arr_0``
uint8 NHWC, any size: Inception resizes to 299) and/or precomputed statistics (``mu``, ``sigma``,
``mu_s``, ``sigma_s``); FID/sFID come from stored statistics when present, otherwise from the
images; precision/recall (k=3) from the reference's ``pool_features`` or ``arr_0`` against the
samples; the Inception Score from the samples when the Inception weights have a classifier head.
Used by ``python -m pdm_jax.cli.evaluate``, ``--mode=eval`` and FID during training.
"""

from __future__ import annotations

from typing import Any

from pdm_jax.evaluation import metrics, npz_stats
from pdm_jax.evaluation import precision_recall as precision_recall_lib


def needs_features(path: str) -> bool:
    """Whether evaluating ``path`` needs the Inception network (it has images but not all of
    statistics + pool_features). Raises for unusable files (naming the path)."""
    has_stats, has_images = npz_stats.describe(path)
    if not has_images:
        return False
    return not (has_stats and "pool_features" in npz_stats.npz_keys(path))


def load_side(path: str, extractor: Any | None, mesh: Any | None,
              batch_size: int) -> npz_stats.BatchStats:
    """One side of an evaluation from an ADM-layout .npz.

    Args:
      path: .npz with images and/or statistics.
      extractor: Inception extractor, needed when ``needs_features(path)``.
      mesh: device mesh for the extractor.
      batch_size: images per Inception batch (divisible by the device count).

    Returns:
      Statistics (stored ones win over computed ones, as in ADM), features and logits when the
      file has images.
    """
    has_stats, _ = npz_stats.describe(path)
    stored = npz_stats.load_stats(path) if has_stats else None
    if not needs_features(path):
        return stored
    if extractor is None:
        raise ValueError(f"{path} holds images; computing their features needs --inception_path.")
    from pdm_jax.evaluation import features

    n = npz_stats.num_images(path)
    if n < 2:
        raise ValueError(f"{path} holds {n} image(s); statistics need at least 2.")
    stats = features.empty_stats(extractor, max_sample=n)
    stats, _ = features.accumulate_host_batches(
        features.make_feature_fn(extractor, mesh), npz_stats.iter_images(path, batch_size), stats,
        mesh, batch_size)
    computed = npz_stats.BatchStats.from_feature_stats(stats)
    if stored is None:
        return computed
    stored.pool_features, stored.logits = computed.pool_features, computed.logits
    stored.logits_note = computed.logits_note
    return stored


def compute_metrics(ref: npz_stats.BatchStats, sample: npz_stats.BatchStats) -> dict[str, Any]:
    """FID, sFID, Inception Score and precision/recall of samples against a reference.

    Metrics that cannot be computed are None with the reason under ``notes``.

    Args:
      ref: reference statistics (and pool features for precision/recall).
      sample: sample statistics (and pool features / logits).

    Returns:
      A JSON-serialisable dict.
    """
    result: dict[str, Any] = {
        "fid": metrics.frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma),
        "sfid": metrics.frechet_distance(sample.mu_s, sample.sigma_s, ref.mu_s, ref.sigma_s),
        "inception_score": None, "precision": None, "recall": None, "notes": {},
        "num_samples": sample.count, "num_ref": ref.count,
    }
    if sample.logits is not None:
        result["inception_score"] = metrics.inception_score(sample.logits)
        result["inception_score_splits"] = -(-len(sample.logits) // metrics.IS_SPLIT_SIZE)
    else:
        result["notes"]["inception_score"] = sample.logits_note or "no logits for the samples"
    if ref.pool_features is None or sample.pool_features is None:
        side = "reference" if ref.pool_features is None else "sample"
        result["notes"]["precision_recall"] = (f"the {side} file has no images or "
                                               f"pool_features")
    elif min(len(ref.pool_features), len(sample.pool_features)) <= precision_recall_lib.PR_K:
        result["notes"]["precision_recall"] = f"needs more than k={precision_recall_lib.PR_K} points per set"
    else:
        result["precision"], result["recall"] = precision_recall_lib.precision_recall(
            ref.pool_features, sample.pool_features)
        result["num_pr_ref"] = len(ref.pool_features)
        result["num_pr_samples"] = len(sample.pool_features)
    if not result["notes"]:
        del result["notes"]
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """ADM's printout, one metric per line ('null (reason)' for those not computed)."""
    notes = result.get("notes", {})
    lines = []
    for label, key, note in (("Inception Score", "inception_score", "inception_score"),
                             ("FID", "fid", ""), ("sFID", "sfid", ""),
                             ("Precision", "precision", "precision_recall"),
                             ("Recall", "recall", "precision_recall")):
        value = result[key]
        lines.append(f"{label}: {value}" if value is not None
                     else f"{label}: null ({notes.get(note, 'not computed')})")
    return "\n".join(lines)
