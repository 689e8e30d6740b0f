"""``--mode=ref_stats``: a reference batch of the run's dataset in ADM's layout (SPEC 9).

Uses at most ``eval.num_samples`` images (all of the split when it is smaller) read once through
the training pipeline without flips (shuffled with the data section's buffer and ``seed``, so a
subset is a random one); every process reads its own part. Writes
``WORKDIR/ref_stats/<dataset>_<image size>.npz`` (statistics, pool features and up to 10k images,
not stored above 4 GiB).
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from pdm_jax import config_validation, io as io_lib, sharding
from pdm_jax.data import datasets, pipeline
from pdm_jax.evaluation import features, inception, metrics, npz_stats

# Reference images kept in a written reference file (ADM's ImageNet batches hold 10k), unless
# they exceed this many bytes (e.g. 10k images at 1024^2): then only statistics and features.
MAX_REF_IMAGE_BYTES = 4 << 30


def ref_stats_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``WORKDIR/ref_stats/<dataset>_<image size>.npz``."""
    name = config.data.name.replace("/", "_").replace(":", "_")
    if config.data.name == datasets.FOLDER_NAME:
        name = f"folder_{os.path.basename(os.path.normpath(config.data.folder))}"
    return f"{workdir}/ref_stats/{name}_{config.data.image_size}.npz"


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the reference statistics of the config's dataset; returns the .npz path."""
    config_validation.validate(config, "ref_stats", workdir)
    e = config.eval
    process_count = jax.process_count()
    data_config = dict(config.data.to_dict(), random_flip=False)
    ds = pipeline.make_train_dataset(data_config, global_batch_size=e.batch_size,
                                     seed=config.seed, process_index=jax.process_index(),
                                     process_count=process_count)
    size = datasets.dataset_size(config.data)
    # Each process's stream starts with one pass over its size // process_count records.
    per_process = min(size // process_count, math.ceil(e.num_samples / process_count))
    if per_process * process_count < 2:
        raise ValueError(f"{config.data.name!r} ({config.data.split}) has {size} images; "
                         f"reference statistics need at least 2 per run.")
    mesh = sharding.make_mesh(config.mesh.shape)
    extractor = inception.load_inception(e.inception_path)
    keep = min(npz_stats.REF_IMAGES, per_process * process_count)
    keep_images = keep * config.data.image_size ** 2 * 3 <= MAX_REF_IMAGE_BYTES
    local_keep = math.ceil(keep / process_count)

    def batches():
        remaining = per_process
        for batch in pipeline.iterate_numpy(ds):
            if remaining <= 0:
                return
            images = io_lib.data_to_uint8(batch["image"][:remaining])
            remaining -= len(images)
            yield images

    logging.info("Reference statistics of %d images of %s (%s) at %d px", per_process *
                 process_count, config.data.name, config.data.split, config.data.image_size)
    stats, images = features.accumulate_host_batches(
        features.make_feature_fn(extractor, mesh), batches(),
        features.empty_stats(extractor, max_sample=local_keep), mesh,
        e.batch_size // process_count, keep_images=local_keep if keep_images else 0)
    stats = metrics.merge_across_processes(stats, max_sample=keep)
    if keep_images:
        images = np.concatenate(metrics.allgather_rows(images, local_keep))[:keep]
    else:
        logging.warning("Not storing %d reference images of %d px (over %d GiB): the file has "
                        "statistics and pool_features only.", keep, config.data.image_size,
                        MAX_REF_IMAGE_BYTES >> 30)
        images = None
    path = ref_stats_path(config, workdir)
    if jax.process_index() == 0:
        npz_stats.save_reference(path, stats, images)
        logging.info("Wrote reference statistics of %d images (%d kept for precision/recall) to "
                     "%s", stats.count, len(stats.pool_sample), path)
    return path
