"""What training does now and then besides stepping: sample grids and FID of the EMA experts.

Both need the whole ensemble (a run that trains one expert of several has neither) and run on
every process (sampling is a collective); process 0 writes.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pdm_jax import io as io_lib, sampling
from pdm_jax.diffusion.experts import experts_from_config


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action runs at ``step``: every ``every`` steps and at the last one."""
    return every > 0 and (step % every == 0 or step == last)


class SampleGrid:
    """A fixed-seed grid of ``train.grid_size`` EMA samples: PNG under WORKDIR/samples and
    TensorBoard, so a user watches the model learn."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, workdir: str):
        t = config.train
        size = t.grid_size + (-t.grid_size) % mesh.size  # a multiple of the device count
        num_classes = experts_from_config(config)[0].model.num_classes
        self._fn = sampling.make_sample_fn(config, mesh, steps=t.grid_steps, sampler="ddpm",
                                           eta=0.0, guidance_scale=config.sample.guidance_scale,
                                           batch_size=size)
        self._labels = jnp.asarray(sampling.balanced_labels(0, size, num_classes))
        self._columns = sampling.grid_columns(size, num_classes)  # a column per class
        self._workdir = workdir

    def __call__(self, step: int, emas: Sequence[Any], writer: metric_writers.MetricWriter):
        start = time.perf_counter()
        images = io_lib.to_uint8(multihost_utils.process_allgather(
            self._fn(list(emas), jax.random.PRNGKey(step), self._labels), tiled=True))
        grid = io_lib.image_grid(images, self._columns)
        if jax.process_index() == 0:
            io_lib.save_png(f"{self._workdir}/samples/grid_step{step:08d}.png", grid)
        writer.write_images(step, {"samples": grid[None]})
        logging.info("Sample grid at step %d took %.1fs", step, time.perf_counter() - start)


class PeriodicFid:
    """FID/sFID/precision/recall (+ IS) of ``train.fid_num_samples`` EMA samples, written as
    ``eval/*`` scalars (the scorer of ``--mode=eval``, loaded once)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        from pdm_jax.evaluation import scorer  # Inception and the reference load only if used

        t = config.train
        self._score = scorer.make_scorer(config, mesh, num_samples=t.fid_num_samples,
                                         steps=t.fid_steps)

    def __call__(self, step: int, emas: Sequence[Any],
                 writer: metric_writers.MetricWriter) -> dict[str, float]:
        result = self._score(emas)
        scalars = {f"eval/{k}": float(result[k]) for k in
                   ("fid", "sfid", "inception_score", "precision", "recall")
                   if result[k] is not None}
        writer.write_scalars(step, scalars)
        logging.info("Step %d, %d samples (%s%s, w=%g): %s (%.0fs)", step,
                     result["num_samples"], result["sampler"], result["steps"],
                     result["guidance_scale"],
                     ", ".join(f"{k[5:]} {v:.4g}" for k, v in scalars.items()),
                     result["sample_and_feature_seconds"])
        return scalars
