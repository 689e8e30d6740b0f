"""Sampling job: EMA weights -> jitted, sharded sampler -> .npz (ADM layout) + PNG grid."""

from __future__ import annotations

import io
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pdm_jax import checkpointing, config_lib, metrics, sharding, train_state
from pdm_jax.diffusion import samplers
from pdm_jax.diffusion.schedules import Schedule

SampleFn = Callable[[dict, jax.Array, jax.Array], jax.Array]


def make_sample_fn(config: ml_collections.ConfigDict, mesh: Mesh, *, steps: str, sampler: str,
                   eta: float, guidance_scale: float, batch_size: int) -> SampleFn:
    """A jitted ``fn(params, rng, labels) -> images in [-1, 1]`` sharded over the mesh batch.

    The whole reverse chain runs as one lax.scan inside one jit (SPEC 5).

    Args:
      config: run config (model and diffusion sections are read).
      mesh: device mesh; the batch is sharded over ('data', 'fsdp').
      steps: respacing string, e.g. "250", "ddim50".
      sampler: 'ddpm' or 'ddim'.
      eta: DDIM eta.
      guidance_scale: classifier-free guidance w (1 = unguided).
      batch_size: global number of images per call (divisible by the device count).

    Returns:
      The sampling function.
    """
    unet = config_lib.unet_config(config)
    graphdef = train_state.model_graphdef(unet)
    schedule = Schedule.from_name(config.diffusion.schedule,
                                  config.diffusion.num_timesteps).respace(steps)
    if batch_size % mesh.size:
        raise ValueError(f"Sampling batch size {batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh.")
    shape = (batch_size, unet.image_size, unet.image_size, unet.in_channels)
    conditional = unet.num_classes > 0

    def model_fn(params):
        model = nnx.merge(graphdef, params)
        return lambda x, t, y: model(x, t, y)

    def sample(params, rng, labels):
        return samplers.sample_loop(
            model_fn(params), rng, shape, schedule, sampler=sampler, eta=eta,
            parameterization=config.diffusion.parameterization,
            labels=labels if conditional else None, null_label=unet.num_classes,
            guidance_scale=guidance_scale if conditional else 1.0,
            learn_sigma=unet.learn_sigma)

    batch = sharding.batch_sharding(mesh)
    out = jax.jit(sample, out_shardings=batch)
    return lambda params, rng, labels: out(params, rng, jax.device_put(labels, batch))


def balanced_labels(start: int, count: int, num_classes: int) -> np.ndarray:
    """Labels i mod num_classes for sample indices start..start+count-1 (0 if unconditional)."""
    if num_classes <= 0:
        return np.zeros((count,), np.int32)
    return (np.arange(start, start + count) % num_classes).astype(np.int32)


def restore_ema(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> tuple[dict, int]:
    """The latest EMA parameters of the run in ``workdir``, sharded over ``mesh``.

    Raises:
      FileNotFoundError: no checkpoint in the workdir.
    """
    unet = config_lib.unet_config(config)
    tx = train_state.make_optimizer(config.optim)
    abstract, _ = train_state.state_shardings(unet, tx, mesh, config.seed)
    with checkpointing.Checkpointer(
            f"{workdir}/checkpoints",
            config_fingerprint=config_lib.architecture_fingerprint(config)) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"No checkpoint under {workdir}/checkpoints: train first "
                                    f"(--mode=train) or point --workdir at a trained run.")
        state, _ = ckpt.restore(abstract, step)
    return state["ema"], step


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
    ema, step = restore_ema(config, workdir, mesh)
    num_classes = config_lib.unet_config(config).num_classes
    sample_fn = make_sample_fn(config, mesh, steps=s.steps, sampler=s.sampler, eta=s.eta,
                               guidance_scale=s.guidance_scale, batch_size=s.batch_size)
    rng = jax.random.PRNGKey(s.seed)
    images, labels = [], []
    for start in range(0, s.num_samples, s.batch_size):
        batch_labels = balanced_labels(start, s.batch_size, num_classes)
        batch = sample_fn(ema, jax.random.fold_in(rng, start), jnp.asarray(batch_labels))
        images.append(metrics.to_uint8(multihost_utils.process_allgather(batch, tiled=True)))
        labels.append(batch_labels)
        logging.info("Sampled %d/%d images", min(start + s.batch_size, s.num_samples),
                     s.num_samples)
    images = np.concatenate(images)[:s.num_samples]
    labels = np.concatenate(labels)[:s.num_samples]
    name = s.name or (f"{s.sampler}{s.steps}_w{s.guidance_scale:g}_eta{s.eta:g}"
                      f"_n{s.num_samples}_step{step}")
    out_dir = f"{workdir}/samples"
    path = f"{out_dir}/{name}.npz"
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(out_dir)
        write_npz(path, images, labels)
        metrics.save_png(f"{out_dir}/{name}.png", metrics.image_grid(images[:64]))
        logging.info("Wrote %d samples (%s, steps=%s, w=%g, eta=%g, checkpoint step %d) to %s",
                     len(images), s.sampler, s.steps, s.guidance_scale, s.eta, step, path)
    return path
