"""One variant of benchmarks/paper_claims.py: its config, analytic cost, training and scoring.

Training is a thin loop over the project's jitted train step (``training.step.jit_train_step``,
the same step ``--mode=train`` runs) on batches drawn from the study's in-memory images with
random flips; sampling and scoring are the project's (``sampling.make_sample_fn``,
``evaluation.floor.reference_scorer`` -> ``scorer.make_scorer``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from paper_claims_studies import Variant
from pdm_jax import io as io_lib
from pdm_jax import sampling, sharding
from pdm_jax.diffusion.experts import experts_from_config, sampling_steps_per_expert
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.evaluation import floor as floor_lib
from pdm_jax.jobs.summary import forward_macs
from pdm_jax.training.state import setup_experts
from pdm_jax.training.step import jit_train_step


def variant_config(base: ml_collections.ConfigDict, variant: Variant) -> ml_collections.ConfigDict:
    """The study's base config with one variant's patch sizes, objective and seed."""
    from pdm_jax import config_validation

    c = ml_collections.ConfigDict(base.to_dict())
    over = variant.overrides()
    c.diffusion.update(over["diffusion"])
    if "experts" in over:
        c.experts = [dict(e, snr_interval=tuple(float(x) for x in e["snr_interval"]))
                     for e in over["experts"]]
    else:
        c.model.patch_size = over["model"]["patch_size"]
    c.seed = base.seed + variant.seed_offset
    c.sample.seed = base.sample.seed + variant.seed_offset
    config_validation.validate(c, "summary")  # the data were checked once, on the base config
    return c


def cost(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Analytic cost (no compile): MACs per forward per expert, train FLOPs per step.

    Train FLOPs per step = sum over experts of 6 x MACs per forward x batch (forward and
    backward are three forwards, two FLOPs per MAC; benchmarks/model_cost.py's convention):
    every expert trains on every batch. ``gmacs_per_forward`` is the mean over the sampler's
    steps (each runs the expert owning its SNR), i.e. the cost of one denoiser call.
    """
    experts = experts_from_config(config)
    macs = [forward_macs(expert.model) for expert in experts]
    d = config.diffusion
    respaced = Schedule.from_name(d.schedule, d.num_timesteps).respace(config.sample.steps)
    owned = sampling_steps_per_expert(experts, respaced)
    return {"experts": [{"snr_interval": list(e.snr_interval), "patch_size": e.model.patch_size,
                         "gmacs_per_forward": m / 1e9, "sampling_steps": n}
                        for e, m, n in zip(experts, macs, owned)],
            "gmacs_per_forward": sum(m * n for m, n in zip(macs, owned)) / sum(owned) / 1e9,
            "flops_per_step": 6.0 * sum(macs) * config.train.batch_size}


def train(config: ml_collections.ConfigDict, mesh: Mesh, images: np.ndarray,
          labels: np.ndarray, steps: int) -> tuple[list[Any], dict[str, Any]]:
    """Trains every expert of ``config`` for ``steps`` steps of the project's train step.

    Args:
      config: variant config.
      mesh: device mesh.
      images: uint8 NHWC training images.
      labels: int32 labels (ignored by an unconditional model).
      steps: train steps.

    Returns:
      (EMA parameters per expert in config order, measurements: the first step's seconds
      (compile included), the median seconds of the later steps, steps/s, the mean loss of the
      last tenth of the steps, non-finite steps).
    """
    setups = setup_experts(config, mesh)
    state = {s.name: s.create_state() for s in setups}
    schedule = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
    step_fn = jit_train_step(config, setups, schedule, mesh)
    rng = np.random.default_rng(config.seed)
    batch_size = config.train.batch_size
    times, losses, nonfinite = [], [], 0
    for _ in range(steps):
        idx = rng.integers(0, len(images), batch_size)
        flip = rng.random(batch_size) < 0.5
        x = np.where(flip[:, None, None, None], images[idx, :, ::-1], images[idx])
        batch = sharding.global_batch({"image": x.astype(np.float32) / 127.5 - 1.0,
                                       "label": labels[idx]}, mesh)
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        # Fetching waits for the step: each step is timed alone (the batch is made before).
        loss, bad = jax.device_get((metrics["loss"], metrics["nonfinite"]))
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
        nonfinite += int(bad > 0)
    step_s = statistics.median(times[1:]) if steps > 1 else float("nan")
    tail = losses[-max(1, steps // 10):]
    return [state[s.name]["ema"] for s in setups], {
        "steps": steps, "batch_size": batch_size, "images_seen": steps * batch_size,
        "train_compile_s": times[0], "train_step_s": step_s, "train_steps_per_s": 1.0 / step_s,
        "final_loss": float(np.mean(tail)), "nonfinite_steps": nonfinite}


def sampling_key(config: ml_collections.ConfigDict) -> str:
    """What a variant's sampling program and scores depend on (not its loss or budget)."""
    return json.dumps({"experts": [[e.snr_interval, dataclasses.asdict(e.model)]
                                   for e in experts_from_config(config)],
                       "diffusion": {k: config.diffusion[k] for k in (
                           "schedule", "num_timesteps", "parameterization")},
                       "sample": config.sample.to_dict()}, sort_keys=True, default=str)


class Programs:
    """The sampling function and scorer of the latest sampling key: consecutive variants that
    differ only in loss weighting or budget (P=4 at equal images and at equal FLOPs) share
    compiled code. One key at a time: a scorer holds Inception's weights on every device."""

    def __init__(self, mesh: Mesh, ref: floor_lib.Reference):
        self.mesh, self.ref = mesh, ref
        self._key, self._sampler, self._scorer = "", None, None

    def _use(self, config: ml_collections.ConfigDict) -> None:
        key = sampling_key(config)
        if key != self._key:
            self._key, self._sampler, self._scorer = key, None, None

    def sampler(self, config: ml_collections.ConfigDict) -> sampling.SampleFn:
        self._use(config)
        if self._sampler is None:
            s = config.sample
            self._sampler = sampling.make_sample_fn(
                config, self.mesh, steps=s.steps, sampler=s.sampler, eta=s.eta,
                guidance_scale=s.guidance_scale, batch_size=s.batch_size)
        return self._sampler

    def scorer(self, config: ml_collections.ConfigDict) -> Any:
        self._use(config)
        if self._scorer is None:
            self._scorer = floor_lib.reference_scorer(
                config, self.mesh, self.ref, steps=config.sample.steps,
                batch_size=config.sample.batch_size)
        return self._scorer


def sample_grid_and_time(config: ml_collections.ConfigDict, programs: Programs, emas: list[Any],
                         grid_path: str, timing_calls: int) -> dict[str, Any]:
    """One sampling batch as a PNG grid, then the median time of ``timing_calls`` more batches.

    The sampler has the scorer's settings and batch size (so its program is the scorer's).

    Returns:
      {} or sampling measurements: seconds per batch, sampler steps/s, images/s.
    """
    s = config.sample
    sample_fn = programs.sampler(config)
    num_classes = experts_from_config(config)[0].model.num_classes
    labels = jnp.asarray(sampling.balanced_labels(0, s.batch_size, num_classes))
    if grid_path:
        grid, _ = sampling.sample_images(sample_fn, emas, num=s.batch_size,
                                         batch_size=s.batch_size, seed=s.seed,
                                         num_classes=num_classes)
        io_lib.save_png(grid_path, io_lib.image_grid(grid), min_size=0)
    elif timing_calls:  # compile before timing
        jax.block_until_ready(sample_fn(emas, jax.random.PRNGKey(1), labels))
    times = []
    for k in range(timing_calls):
        start = time.perf_counter()
        jax.block_until_ready(sample_fn(emas, jax.random.PRNGKey(2 + k), labels))
        times.append(time.perf_counter() - start)
    if not times:
        return {}
    per_batch = statistics.median(times)
    num_steps = len(Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
                    .respace(s.steps).timesteps)
    return {"sample_batch_s": per_batch, "sample_batch_size": s.batch_size,
            "sampler_steps_per_s": num_steps / per_batch,
            "sample_images_per_s": s.batch_size / per_batch}


def run_variant(config: ml_collections.ConfigDict, programs: Programs, images: np.ndarray,
                labels: np.ndarray, *, steps: int, timing_calls: int,
                grid_path: str) -> dict[str, Any]:
    """Trains, samples (grid, timing) and scores one variant; returns its measurements."""
    start = time.perf_counter()
    emas, row = train(config, programs.mesh, images, labels, steps)
    row.update(sample_grid_and_time(config, programs, emas, grid_path, timing_calls))
    scored = programs.scorer(config)(emas)
    row.update({k: scored[k] for k in floor_lib.METRIC_KEYS})
    row.update(sampler=scored["sampler"], sample_steps=scored["steps"],
               guidance_scale=scored["guidance_scale"], sample_seed=scored["seed"],
               score_s=scored["sample_and_feature_seconds"], grid=grid_path or None,
               wall_s=time.perf_counter() - start)
    return row


def random_inception(directory: str) -> str:
    """Random Inception weights of the right shapes (--smoke without real weights); returns
    the file's path."""
    from pdm_jax.evaluation import inception

    weights = inception.random_weights()
    path = os.path.join(directory, "random_inception.safetensors")
    inception.save_inception_weights(path, weights, source="random (paper_claims --smoke)")
    return path
