"""Sampling job: EMA weights -> jitted, sharded sampler (sample_lib) -> .npz (ADM layout) + PNG."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.sharding import Mesh

from pdm_jax import checkpointing, config_lib, metrics, sharding, train_state
from pdm_jax.experts import experts_from_config
# The tf-free sampler core lives in sample_lib (the inference API uses it without TensorFlow);
# re-exported here for callers of sample.make_sample_fn / sample.balanced_labels.
from pdm_jax.sample_lib import (  # noqa: F401
    SampleFn, balanced_labels, make_sample_fn, sample_images)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (``<workdir>/config.json``)."""
    path = f"{workdir}/config.json"
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: not a pdm_jax training workdir.")
    with tf.io.gfile.GFile(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_expert_state(workdir: str, expert_index: int, mesh: Mesh,
                      config: ml_collections.ConfigDict | None = None) -> tuple[dict, int]:
    """The latest train state of one expert of the run in ``workdir``, sharded over ``mesh``.

    Args:
      workdir: training workdir.
      expert_index: which expert of that run's config.
      mesh: where to place the state.
      config: that run's config; read from ``<workdir>/config.json`` when None.

    Returns:
      (state dict with 'params', 'ema', 'opt_state', 'step', 'rng'; its checkpoint step).

    Raises:
      FileNotFoundError: the expert has no checkpoint, naming it and the directory.
    """
    config = read_run_config(workdir) if config is None else config
    experts = experts_from_config(config)
    if not 0 <= expert_index < len(experts):
        raise ValueError(f"Expert {expert_index} does not exist in {workdir} "
                         f"({len(experts)} experts).")
    expert = experts[expert_index]
    tx = train_state.make_optimizer(expert.optim)
    abstract, _ = train_state.state_shardings(expert.model, tx, mesh)
    directory = f"{workdir}/checkpoints/{expert.name}"
    with checkpointing.Checkpointer(
            directory, config_fingerprint=config_lib.architecture_fingerprint(
                expert.model, expert.optim)) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"No checkpoint for {expert.describe()} under {directory}: train it first "
                f"(--mode=train --config.train.expert={expert_index}).")
        state, _ = ckpt.restore(abstract, step)
    logging.info("Loaded %s from step %d", expert.describe(), step)
    return state, step


def load_expert_ema(workdir: str, expert_index: int, mesh: Mesh,
                    config: ml_collections.ConfigDict | None = None) -> dict:
    """The latest EMA parameters of one expert of the run in ``workdir``, sharded over ``mesh``.

    Args:
      workdir: training workdir.
      expert_index: which expert of that run's config.
      mesh: where to place the parameters.
      config: that run's config; read from ``<workdir>/config.json`` when None.

    Raises:
      FileNotFoundError: the expert has no checkpoint, naming it and the directory.
    """
    return load_expert_state(workdir, expert_index, mesh, config)[0]["ema"]


def write_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes ``arr_0`` uint8 NHWC and ``arr_1`` labels (ADM evaluator layout), atomically."""
    metrics.save_npz_atomically(path, {"arr_0": images, "arr_1": labels})


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``--mode=sample``: samples ``sample.num_samples`` images with the latest EMA weights.

    Returns:
      Path of the written .npz file.
    """
    config_lib.validate(config)
    s = config.sample
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    experts = experts_from_config(config)
    emas = [load_expert_ema(workdir, e.index, mesh, config) for e in experts]
    sample_fn = make_sample_fn(config, mesh, steps=s.steps, sampler=s.sampler, eta=s.eta,
                               guidance_scale=s.guidance_scale, batch_size=s.batch_size)
    images, labels = sample_images(
        sample_fn, emas, num=s.num_samples, batch_size=s.batch_size, seed=s.seed,
        num_classes=experts[0].model.num_classes,
        on_batch=lambda done: logging.info("Sampled %d/%d images", done, s.num_samples))
    name = s.name or (f"{s.sampler}{s.steps}_w{s.guidance_scale:g}_eta{s.eta:g}"
                      f"_n{s.num_samples}")
    out_dir = f"{workdir}/samples"
    path = f"{out_dir}/{name}.npz"
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(out_dir)
        write_npz(path, images, labels)
        metrics.save_png(f"{out_dir}/{name}.png", metrics.image_grid(images[:64]))
        logging.info("Wrote %d samples (%s, steps=%s, w=%g, eta=%g) to %s",
                     len(images), s.sampler, s.steps, s.guidance_scale, s.eta, path)
    return path
