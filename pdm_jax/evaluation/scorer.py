"""Scoring a model's samples against a reference: sample, Inception features, ADM's metrics.

:func:`make_scorer` loads Inception and the reference once and compiles the sampler and the
feature function once; ``--mode=eval`` calls the scorer once with many samples, training calls
it every ``train.fid_every`` steps with few.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from pdm_jax import sampling
from pdm_jax.diffusion.experts import experts_from_config
from pdm_jax.evaluation import features, inception, metrics, npz_stats, report

Scorer = Callable[[Sequence[Any]], dict[str, Any]]


def make_scorer(config: ml_collections.ConfigDict, mesh: Mesh, *, num_samples: int, steps: str,
                on_batch: Callable[[int], None] | None = None,
                labels: np.ndarray | None = None) -> Scorer:
    """Loads Inception and the reference once; returns ``score(emas) -> metrics``.

    ``score`` samples ``num_samples`` images with the given EMA parameters (one per expert, in
    config order) using the ``sample`` section's sampler, eta, guidance and seed with respacing
    ``steps``, in global batches of ``eval.batch_size`` over every device of every process. Each
    batch goes straight through Inception on the same devices, each process folds only its own
    rows into streaming statistics, and those are merged across processes (no image is
    gathered). With the same batch size and seed it scores the very images ``--mode=sample``
    writes.

    Args:
      config: run config (validated by the caller).
      mesh: device mesh.
      num_samples: images per call.
      steps: respacing string of the sampler.
      on_batch: called with the number of batches done (progress reports).
      labels: int (num_samples,) class of each sample, e.g. the reference images' own labels so
        the samples follow the data's class frequencies; None: balanced (i mod num_classes), as
        ``--mode=sample`` draws them.

    Returns:
      The scoring function; its dict is ``report.compute_metrics``' plus the sampling settings.
    """
    e, s = config.eval, config.sample
    extractor = inception.load_inception(e.inception_path)
    # The reference first: it is cheap and a bad file fails before any sampling. Every process
    # computes the same reference statistics from the whole file (its rows of a replicated feed).
    ref = report.load_side(e.ref_path, extractor, mesh, e.batch_size // jax.process_count())
    num_classes = experts_from_config(config)[0].model.num_classes
    sample_fn = sampling.make_sample_fn(config, mesh, steps=steps, sampler=s.sampler, eta=s.eta,
                                        guidance_scale=s.guidance_scale,
                                        batch_size=e.batch_size)
    feature_fn = features.make_feature_fn(extractor, mesh)
    local_cap = math.ceil(num_samples / jax.process_count())
    if labels is not None:
        labels = sampling.check_labels(labels, num_samples, num_classes)
        # Padding rows of the last batch (cut before scoring) take class 0.
        labels = np.pad(labels, (0, -num_samples % e.batch_size))

    def score(emas: Sequence[Any]) -> dict[str, Any]:
        stats = features.empty_stats(extractor, max_sample=local_cap)
        rng = jax.random.PRNGKey(s.seed)  # as --mode=sample: batch `start` uses fold_in(rng, start)
        t0 = time.time()
        for start in range(0, num_samples, e.batch_size):
            batch_labels = (sampling.balanced_labels(start, e.batch_size, num_classes)
                            if labels is None else labels[start:start + e.batch_size])
            images = sample_fn(list(emas), jax.random.fold_in(rng, start),
                               jnp.asarray(batch_labels))
            stats = stats.update(features.local_rows(feature_fn(images),
                                                     limit=num_samples - start))
            if on_batch is not None:
                on_batch(start // e.batch_size + 1)
        stats = metrics.merge_across_processes(stats, max_sample=num_samples)
        result = report.compute_metrics(ref, npz_stats.BatchStats.from_feature_stats(stats))
        result.update(sampler=s.sampler, steps=steps, guidance_scale=s.guidance_scale, eta=s.eta,
                      seed=s.seed, ref_path=e.ref_path, inception_path=e.inception_path,
                      inception_source=extractor.source,
                      sample_and_feature_seconds=time.time() - t0)
        return result

    return score
