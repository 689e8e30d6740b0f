"""Config conventions shared by every file in configs/ (big_vision style).

A config file defines ``get_config(arg)``; ``arg`` is a typed argument string such as
``"patch=4,smoke"`` parsed once by :func:`parse_arg`. :func:`base_config` holds every section
with its defaults, so a config file states only what differs, and :func:`validate` rejects bad
values with a clear message before any compile or data loading starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import ml_collections

from pdm_jax import experts as experts_lib
from pdm_jax.diffusion import losses, samplers, schedules
from pdm_jax.models.unet import UNetConfig


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"key=value,flag"`` into a ConfigDict typed by ``defaults``.

    Args:
      arg: the string after ':' in ``--config=configs/x.py:arg``; may be None or empty.
      **defaults: every accepted key with its default; a bare ``flag`` sets a bool to True.

    Returns:
      ConfigDict with one entry per default.

    Raises:
      ValueError: unknown keys, naming the accepted ones.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r} in {arg!r}; accepted: "
                             f"{sorted(defaults)}.")
        default = defaults[key]
        if isinstance(default, bool):
            result[key] = value.lower() not in ("0", "false", "no") if value else True
        elif value == "":
            raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
        else:
            result[key] = type(default)(value) if default is not None else value
    return result


def base_config() -> ml_collections.ConfigDict:
    """Every section and key with its default (config files override what they need)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = dict(name="pdm_emoji_demo", image_size=64, folder="", data_dir="", manual_dir="",
                  split="train", shuffle_buffer=10_000, random_flip=True,
                  class_conditional=False, cache=False,
                  # True: every process reads the single-process stream and keeps its rows, so
                  # the global batches do not depend on the process count (P times the reading;
                  # for small datasets and reproducibility). False: each reads its own shard.
                  global_order=False)
    c.model = dict(image_size=64, patch_size=4, in_channels=3, model_channels=128,
                   channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8),
                   num_head_channels=64, num_classes=0, learn_sigma=True, dropout=0.0,
                   num_groups=32, norm_eps=1e-5, out_norm_eps=1e-3, dtype="float32",
                   remat=False, variance_grad_to_time_mlp=True)
    c.diffusion = dict(schedule="linear", num_timesteps=1000, parameterization="x0",
                       weighting="sqrt_snr")
    # Timestep-split ensemble (SPEC 6): a list of dict(snr_interval=(lo, hi), model={overrides},
    # optim={overrides}, warm_start=dict(workdir=..., expert=K)). Empty: one model, whole chain.
    c.experts = []
    c.optim = dict(lr=1e-4, warmup_steps=5_000, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
                   grad_clip=0.0)
    # fid_every > 0: FID/sFID/precision/recall of fid_num_samples EMA samples (respacing
    # fid_steps, the sample section's sampler and guidance) against eval.ref_path every fid_every
    # steps and at the end, written with the other scalars as eval/fid etc. (needs the eval
    # section's inception_path and ref_path).
    c.train = dict(expert=-1, num_steps=100_000, batch_size=256, log_every=100, sample_every=5_000,
                   ema_decay=0.9999, label_dropout=0.1, grid_size=16, grid_steps="50",
                   fid_every=0, fid_num_samples=1_000, fid_steps="50")
    c.sample = dict(num_samples=64, batch_size=64, steps="250", sampler="ddpm", eta=0.0,
                    guidance_scale=1.5, name="", seed=0)
    c.ckpt = dict(every=5_000, keep=3, async_save=True)
    c.log = dict(tensorboard=True)
    c.mesh = dict(shape=(-1, 1))
    # --mode=export: tensor dtype ('float32' or 'bfloat16') and whether the raw (non-EMA)
    # parameters are written next to the EMA ones.
    c.export = dict(dtype="float32", include_raw=False)
    # --mode=analyze: the optimal denoiser of the data's empirical distribution (analyze.py).
    # timesteps: explicit steps t; empty means num_timesteps steps evenly spaced over the chain.
    # held_out_queries: noisy queries from images outside the num_data images (else from them).
    c.analysis = dict(num_data=2048, num_queries=64, held_out_queries=True, timesteps=(),
                      num_timesteps=25, patch_sizes=(2, 4, 8), chunk_size=256)
    # Evaluation (SPEC 9): the converted TF-FID Inception weights (python -m
    # pdm_jax.convert_inception), the reference batch or its statistics, sample counts.
    c.eval = dict(inception_path="", ref_path="", num_samples=50_000, batch_size=256)
    return c


def unet_config(config: ml_collections.ConfigDict) -> UNetConfig:
    """The UNetConfig of a run config (model section)."""
    return UNetConfig.from_dict(config.model.to_dict())


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a run config; raises ValueError naming the first bad value.

    Runs in milliseconds, before any data loading or compilation.
    """
    for expert in experts_lib.experts_from_config(config):
        expert.model.validate()
    model = unet_config(config)
    if model.image_size != config.data.image_size:
        raise ValueError(f"model.image_size={model.image_size} differs from "
                         f"data.image_size={config.data.image_size}.")
    if config.data.class_conditional and not model.num_classes:
        raise ValueError("data.class_conditional=True needs model.num_classes > 0.")
    d = config.diffusion
    schedules.make_betas(d.schedule, d.num_timesteps)
    if d.parameterization not in losses.PARAMETERIZATIONS:
        raise ValueError(f"Unknown diffusion.parameterization {d.parameterization!r}; expected "
                         f"one of {losses.PARAMETERIZATIONS}.")
    losses.loss_weight(1.0, d.weighting)
    schedules.respace_timesteps(config.sample.steps, d.num_timesteps)
    schedules.respace_timesteps(config.train.grid_steps, d.num_timesteps)
    if config.sample.sampler not in samplers.SAMPLERS:
        raise ValueError(f"Unknown sample.sampler {config.sample.sampler!r}; expected one of "
                         f"{samplers.SAMPLERS}.")
    for section, key in (("train", "num_steps"), ("train", "batch_size"), ("train", "log_every"),
                         ("ckpt", "every"), ("ckpt", "keep"), ("sample", "batch_size")):
        if config[section][key] <= 0:
            raise ValueError(f"{section}.{key} must be positive, got {config[section][key]}.")
    if config.train.fid_every < 0:
        raise ValueError(f"train.fid_every must be >= 0 (0: off), got {config.train.fid_every}.")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}.")
    if not 0.0 <= config.train.label_dropout < 1.0:
        raise ValueError(f"train.label_dropout must be in [0, 1), got "
                         f"{config.train.label_dropout}.")


def architecture_fingerprint(model: UNetConfig, optim: ml_collections.ConfigDict) -> str:
    """Hash of what one expert's checkpoint arrays depend on: model and optimiser structure.

    Schedules, step counts, logging and sampling settings may change across a resume; the model
    architecture and the optimiser's state layout may not.
    """
    relevant = {"model": dataclasses.asdict(model),
                "optim_state": {"grad_clip": bool(optim.grad_clip)}}
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shrink_for_cpu(c: ml_collections.ConfigDict) -> None:
    """The ``smoke`` variant of a recipe: same structure, CPU-sized (16x16, tiny widths).

    Keeps the recipe's dataset, schedule, parameterisation and conditioning; shrinks the image,
    the U-Net, the batch and the step counts so a few train steps run in seconds.
    """
    c.data.image_size = c.model.image_size = 16
    c.data.shuffle_buffer = 64
    c.model.patch_size = min(c.model.patch_size, 2)
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (4,)
    c.model.num_head_channels = 32
    c.model.dtype = "float32"
    c.model.remat = False
    c.optim.warmup_steps = 2
    c.train.num_steps = 4
    c.train.batch_size = 8
    c.train.log_every = 2
    c.train.sample_every = 0
    c.train.grid_size = 8
    c.train.grid_steps = "5"
    c.ckpt.every = 2
    c.sample.num_samples = 8
    c.sample.batch_size = 8
    c.sample.steps = "5"
