"""``--mode=sample``: EMA weights -> the jitted, sharded sampler -> .npz (ADM layout) + PNG grid.

Writes ``WORKDIR/samples/<name>.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) and a grid of the
first 64 images next to it; ``sample.name`` defaults to ``<sampler><steps>_w<w>_eta<eta>_n<N>``.
"""

from __future__ import annotations

import math

import jax
import ml_collections
from absl import logging

from pdm_jax import config_validation, io as io_lib, run_loading, sampling, sharding, writers
from pdm_jax.diffusion.experts import experts_from_config


def sample_name(config: ml_collections.ConfigDict) -> str:
    s = config.sample
    return s.name or f"{s.sampler}{s.steps}_w{s.guidance_scale:g}_eta{s.eta:g}_n{s.num_samples}"


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples ``sample.num_samples`` images with the latest EMA weights; returns the .npz path."""
    config_validation.validate(config, "sample", workdir)
    s = config.sample
    mesh = sharding.make_mesh(config.mesh.shape)
    experts = experts_from_config(config)
    emas = [run_loading.load_expert_ema(workdir, e.index, mesh, config) for e in experts]
    sample_fn = sampling.make_sample_fn(config, mesh, steps=s.steps, sampler=s.sampler,
                                        eta=s.eta, guidance_scale=s.guidance_scale,
                                        batch_size=s.batch_size)
    progress = writers.ReportProgress(num_steps=math.ceil(s.num_samples / s.batch_size),
                                      items_per_step=s.batch_size, what="batch", every_steps=1)
    progress(0)
    images, labels = sampling.sample_images(
        sample_fn, emas, num=s.num_samples, batch_size=s.batch_size, seed=s.seed,
        num_classes=experts[0].model.num_classes, on_batch=progress)
    path = f"{workdir}/samples/{sample_name(config)}.npz"
    if jax.process_index() == 0:
        io_lib.save_samples_npz(path, images, labels)
        io_lib.save_png(path.removesuffix(".npz") + ".png", io_lib.image_grid(
            images[:64], sampling.grid_columns(min(64, len(images)), experts[0].model.num_classes)))
        logging.info("Wrote %d samples (%s, steps=%s, w=%g, eta=%g) to %s",
                     len(images), s.sampler, s.steps, s.guidance_scale, s.eta, path)
    return path
