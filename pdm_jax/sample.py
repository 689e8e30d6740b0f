"""Sampling job: EMA weights -> jitted, sharded sampler -> .npz (ADM layout) + PNG grid."""

from __future__ import annotations

import io
import json
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pdm_jax import checkpointing, config_lib, metrics, sharding, train_state
from pdm_jax.diffusion import samplers
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.experts import dispatching_model_fn, experts_from_config

SampleFn = Callable[[list, jax.Array, jax.Array], jax.Array]


def make_sample_fn(config: ml_collections.ConfigDict, mesh: Mesh, *, steps: str, sampler: str,
                   eta: float, guidance_scale: float, batch_size: int) -> SampleFn:
    """A jitted ``fn(expert_params, rng, labels) -> images in [-1, 1]``, batch-sharded.

    The whole reverse chain runs as one lax.scan inside one jit (SPEC 5); each step runs the
    expert owning its SNR (lax.switch), with guidance applied to every expert.

    Args:
      config: run config (experts, model and diffusion sections are read).
      mesh: device mesh; the batch is sharded over ('data', 'fsdp').
      steps: respacing string, e.g. "250", "ddim50".
      sampler: 'ddpm' or 'ddim'.
      eta: DDIM eta.
      guidance_scale: classifier-free guidance w (1 = unguided).
      batch_size: global number of images per call (divisible by the device count).

    Returns:
      The sampling function; ``expert_params`` lists each expert's parameters in config order.
    """
    experts = experts_from_config(config)
    graphdefs = [train_state.model_graphdef(e.model) for e in experts]
    unet = experts[0].model
    full = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
    schedule = full.respace(steps)
    if batch_size % mesh.size:
        raise ValueError(f"Sampling batch size {batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh.")
    shape = (batch_size, unet.image_size, unet.image_size, unet.in_channels)
    conditional = unet.num_classes > 0

    def sample(expert_params, rng, labels):
        model_fn = dispatching_model_fn(experts, graphdefs, expert_params, full)
        return samplers.sample_loop(
            model_fn, rng, shape, schedule, sampler=sampler, eta=eta,
            parameterization=config.diffusion.parameterization,
            labels=labels if conditional else None, null_label=unet.num_classes,
            guidance_scale=guidance_scale if conditional else 1.0,
            learn_sigma=unet.learn_sigma)

    batch = sharding.batch_sharding(mesh)
    out = jax.jit(sample, out_shardings=batch)
    return lambda expert_params, rng, labels: out(list(expert_params), rng,
                                                  jax.device_put(labels, batch))


def balanced_labels(start: int, count: int, num_classes: int) -> np.ndarray:
    """Labels i mod num_classes for sample indices start..start+count-1 (0 if unconditional)."""
    if num_classes <= 0:
        return np.zeros((count,), np.int32)
    return (np.arange(start, start + count) % num_classes).astype(np.int32)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (``<workdir>/config.json``)."""
    path = f"{workdir}/config.json"
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} does not exist: not a pdm_jax training workdir.")
    with tf.io.gfile.GFile(path) as f:
        return ml_collections.ConfigDict(json.load(f))


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
    logging.info("Loaded EMA of %s from step %d", expert.describe(), step)
    return state["ema"]


def write_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes ``arr_0`` uint8 NHWC and ``arr_1`` labels (ADM evaluator layout), atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images, arr_1=labels)
    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


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
    num_classes = experts[0].model.num_classes
    sample_fn = make_sample_fn(config, mesh, steps=s.steps, sampler=s.sampler, eta=s.eta,
                               guidance_scale=s.guidance_scale, batch_size=s.batch_size)
    rng = jax.random.PRNGKey(s.seed)
    images, labels = [], []
    for start in range(0, s.num_samples, s.batch_size):
        batch_labels = balanced_labels(start, s.batch_size, num_classes)
        batch = sample_fn(emas, jax.random.fold_in(rng, start), jnp.asarray(batch_labels))
        images.append(metrics.to_uint8(multihost_utils.process_allgather(batch, tiled=True)))
        labels.append(batch_labels)
        logging.info("Sampled %d/%d images", min(start + s.batch_size, s.num_samples),
                     s.num_samples)
    images = np.concatenate(images)[:s.num_samples]
    labels = np.concatenate(labels)[:s.num_samples]
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
