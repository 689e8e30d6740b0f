"""The sampler core without TensorFlow or orbax: jitted sharded sampling, labels, batching.

Used by ``--mode=sample`` and ``--mode=eval`` (jobs/), the grids and FID during training and the
standalone inference API (inference.py); sharing :func:`sample_images` keeps their rng folding,
labels and batching identical, so the same seed gives the same images on every path.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pdm_jax import sharding
from pdm_jax.diffusion import samplers
from pdm_jax.diffusion.experts import dispatching_model_fn, experts_from_config
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.io import to_uint8
from pdm_jax.training.state import model_graphdef

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
    graphdefs = [model_graphdef(e.model) for e in experts]
    unet = experts[0].model
    full = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
    schedule = full.respace(steps)
    if batch_size % mesh.size:
        raise ValueError(f"Sampling batch size {batch_size} is not divisible by the "
                         f"{mesh.size} devices of the mesh.")
    shape = (batch_size, unet.image_size, unet.image_size, unet.in_channels)
    conditional = unet.num_classes > 0

    def sample(expert_params, rng, labels):
        # Merged inside each lax.switch branch: only the owning expert's graph is traced there.
        model_fns = [lambda x, t, y, g=g, p=p: nnx.merge(g, p)(x, t, y)
                     for g, p in zip(graphdefs, expert_params)]
        model_fn = dispatching_model_fn(experts, model_fns, full)
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


def grid_columns(num: int, num_classes: int) -> int | None:
    """Grid columns that give each class its own column for balanced labels (i mod classes).

    Args:
      num: images in the grid.
      num_classes: the model's classes (0: unconditional).

    Returns:
      ``num_classes`` when that many columns hold a class each (2 to 16 classes, at least one
      full row); None (a square grid) otherwise.
    """
    return num_classes if 2 <= num_classes <= min(num, 16) else None


def balanced_labels(start: int, count: int, num_classes: int) -> np.ndarray:
    """Labels i mod num_classes for sample indices start..start+count-1 (0 if unconditional)."""
    if num_classes <= 0:
        return np.zeros((count,), np.int32)
    return (np.arange(start, start + count) % num_classes).astype(np.int32)


def check_labels(labels: Any, num: int, num_classes: int) -> np.ndarray:
    """Validates user labels for ``num`` samples; an int means that class for every sample.

    Raises:
      ValueError: labels for an unconditional model, a wrong count, or a class out of range.
    """
    if num_classes <= 0:
        raise ValueError("This model is unconditional (num_classes=0); pass labels=None.")
    array = np.asarray(labels)
    if array.ndim == 0:
        array = np.full((num,), int(array))
    if array.shape != (num,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be one int or {num} ints (one per sample), got shape "
                         f"{array.shape} of {array.dtype}.")
    bad = np.flatnonzero((array < 0) | (array >= num_classes))
    if bad.size:
        raise ValueError(f"labels[{bad[0]}]={array[bad[0]]} is outside [0, {num_classes}) "
                         f"(the model's classes).")
    return array.astype(np.int32)


def sample_images(sample_fn: SampleFn, expert_params: Sequence[Any], *, num: int,
                  batch_size: int, seed: int, num_classes: int,
                  labels: np.ndarray | None = None,
                  on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``num`` images in batches; batch ``start`` uses ``fold_in(PRNGKey(seed), start)``.

    Args:
      sample_fn: from :func:`make_sample_fn` with the same ``batch_size``.
      expert_params: each expert's parameters, in config order.
      num: number of images.
      batch_size: images per sample_fn call; the last batch is cut to ``num``.
      seed: base seed.
      num_classes: the model's class count (0: unconditional).
      labels: int32 (num,) class per image; None draws balanced labels (i mod num_classes).
      on_batch: called with the number of batches done after each batch (progress reports).

    Returns:
      (uint8 NHWC images, int32 labels), both of length ``num``, on every process.
    """
    rng = jax.random.PRNGKey(seed)
    images, used = [], []
    for start in range(0, num, batch_size):
        if labels is None:
            batch_labels = balanced_labels(start, batch_size, num_classes)
        else:
            batch_labels = np.zeros((batch_size,), np.int32)  # padding of the last batch: cut
            chunk = labels[start:start + batch_size]
            batch_labels[:len(chunk)] = chunk
        batch = sample_fn(expert_params, jax.random.fold_in(rng, start),
                          jnp.asarray(batch_labels))
        images.append(to_uint8(multihost_utils.process_allgather(batch, tiled=True)))
        used.append(batch_labels)
        if on_batch is not None:
            on_batch(start // batch_size + 1)
    return np.concatenate(images)[:num], np.concatenate(used)[:num]
