"""``--mode=analyze``: how blurry is the optimal denoiser of the run's data along the chain?

Computes, for the config's data set (demo set, image folder or tfds), the exact optimal denoiser
E[x | z_t] of its empirical distribution at timesteps across the chain and per patch size P the
relative blur that PxP pooling removes (analysis/blur.py). Queries are z_t of images held out of
the data set (``analysis.held_out_queries``, default) or of data images themselves. Writes
``WORKDIR/analysis/optimal_denoiser_blur.json`` and ``.png`` with the ImageNet expert split
(SNR 0.25, SPEC 6) marked.
"""

from __future__ import annotations

import hashlib
import json

import ml_collections
import numpy as np
from absl import logging

from pdm_jax import config_validation, io as io_lib
from pdm_jax.analysis import blur
from pdm_jax.data import datasets, pipeline
from pdm_jax.diffusion import schedules

OUTPUT_NAME = "optimal_denoiser_blur"


def load_images(data_config: ml_collections.ConfigDict, num_data: int, seed: int) -> np.ndarray:
    """Up to ``num_data`` distinct images (N, S, S, 3) in [-1, 1] from the data section.

    Reads the (shuffled, unflipped) training stream and drops repeats, so a data set smaller
    than ``num_data`` yields each of its images once.
    """
    data = dict(data_config.to_dict(), random_flip=False, class_conditional=False)
    batch = min(num_data, 256)
    stream = pipeline.iterate_numpy(pipeline.make_train_dataset(
        data, global_batch_size=batch, seed=seed, process_index=0, process_count=1))
    images, seen, read = [], set(), 0
    # Every image of an epoch comes before any repeat; a full epoch of repeats ends the read.
    while len(images) < num_data and read < 2 * num_data + batch:
        for image in next(stream)["image"]:
            read += 1
            key = hashlib.sha1(image.tobytes()).digest()
            if key not in seen and len(images) < num_data:
                seen.add(key)
                images.append(image)
    if len(images) < num_data:
        logging.info("The data set holds %d distinct images (< analysis.num_data=%d).",
                     len(images), num_data)
    return np.stack(images).astype(np.float32)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the analysis of ``config`` and writes its JSON table and plot under workdir/analysis.

    Returns:
      The result dict written to the JSON file.
    """
    config_validation.validate(config, "analyze", workdir)
    a, d = config.analysis, config.diffusion
    schedule = schedules.Schedule.from_name(d.schedule, d.num_timesteps)
    timesteps = blur.analysis_timesteps(a, d.num_timesteps)
    held_out = bool(a.held_out_queries)
    images = load_images(config.data, int(a.num_data) + held_out * int(a.num_queries),
                         config.seed)
    if held_out:
        # Queries from images outside the data set: E[x | z_t] cannot simply return the query
        # image at high SNR (which in-sample queries show: the empirical optimum memorises).
        if len(images) < 2 * int(a.num_queries):
            raise ValueError(f"held_out_queries needs more than 2 x num_queries={a.num_queries} "
                             f"distinct images; the data set has {len(images)}.")
        num_queries = int(a.num_queries)
        data, queries = images[:-num_queries], images[-num_queries:]
    else:
        data, queries = images, images[:min(int(a.num_queries), len(images))]
    logging.info("Optimal denoiser of %d images (%s), %d queries, %d timesteps",
                 len(data), data.shape[1:], len(queries), len(timesteps))
    patch_sizes = [int(p) for p in a.patch_sizes]
    table = blur.blur_table(data, queries, schedule, timesteps, patch_sizes, int(a.chunk_size),
                       config.seed)
    dataset = config.data.folder if config.data.name == datasets.FOLDER_NAME else config.data.name
    result = {"dataset": dataset, "image_size": int(config.data.image_size),
              "num_data": len(data), "num_queries": len(queries),
              "held_out_queries": held_out, "schedule": d.schedule,
              "num_timesteps": d.num_timesteps, "patch_sizes": patch_sizes,
              "split_snr": blur.SPLIT_SNR, "split_t": blur.split_timestep(schedule), **table}
    out = f"{workdir}/analysis"
    io_lib.write_atomic(f"{out}/{OUTPUT_NAME}.json", json.dumps(result, indent=1))
    io_lib.write_atomic(f"{out}/{OUTPUT_NAME}.png", blur.plot(result))
    logging.info("Wrote %s/%s.{json,png}", out, OUTPUT_NAME)
    return result
