"""Config conventions shared by every file in configs/ (big_vision style).

A config file defines ``get_config(arg)``; ``arg`` is a typed argument string such as
``"patch=4,smoke"`` parsed once by :func:`parse_arg`. :func:`base_config` holds every section
with its defaults, so a config file states only what differs. The one validation pass that every
job runs first is :func:`pdm_jax.config_validation.validate`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any, Mapping

import ml_collections

from pdm_jax.models.unet import UNetConfig

MODES = ("train", "sample", "summary", "export", "analyze", "eval", "ref_stats", "prepare_data")
# Sections that define what a run IS; the other modes take them from the run's config.json.
RUN_SECTIONS = ("data", "model", "diffusion", "experts")
EXPORT_DTYPES = ("float32", "bfloat16")


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
    c.model = dataclasses.asdict(UNetConfig())
    # parameterization: what the network outputs, 'x0' (every released recipe), 'eps' or 'v';
    # the loss is always taken on x0 with the weighting (SPEC 4.3). Prefer x0 (or v) for
    # patched models: eps outputs of a P=4 U-Net were still texture after 3,000 GPU steps and
    # eps models draw colour casts where x0 models draw clean images (README, "Training
    # objectives"); training warns about eps with a patch size above 1.
    c.diffusion = dict(schedule="linear", num_timesteps=1000, parameterization="x0",
                       weighting="sqrt_snr")
    # Timestep-split ensemble (SPEC 6): a list of dict(snr_interval=(lo, hi), model={overrides},
    # optim={overrides}, warm_start=dict(workdir=..., expert=K)). Empty: one model, whole chain.
    c.experts = []
    # schedule: 'constant' after the warmup (every released recipe) or 'cosine' from lr down to
    # final_lr at step decay_steps (warmup included; e.g. train.num_steps).
    c.optim = dict(lr=1e-4, warmup_steps=5_000, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
                   grad_clip=0.0, schedule="constant", decay_steps=0, final_lr=0.0)
    # fid_every > 0: FID/sFID/precision/recall of fid_num_samples EMA samples (respacing
    # fid_steps, the sample section's sampler and guidance) against eval.ref_path every fid_every
    # steps and at the end, written with the other scalars as eval/fid etc. (needs the eval
    # section's inception_path and ref_path).
    # take_over: start even though another live-looking run holds the workdir's lease.
    c.train = dict(expert=-1, num_steps=100_000, batch_size=256, log_every=100, sample_every=5_000,
                   ema_decay=0.9999, label_dropout=0.1, grid_size=16, grid_steps="50",
                   fid_every=0, fid_num_samples=1_000, fid_steps="50", take_over=False)
    c.sample = dict(num_samples=64, batch_size=64, steps="250", sampler="ddpm", eta=0.0,
                    guidance_scale=1.5, name="", seed=0)
    c.ckpt = dict(every=5_000, keep=3, async_save=True)
    c.log = dict(tensorboard=True)
    c.mesh = dict(shape=(-1, 1))
    # --mode=export: destination ('' = WORKDIR/export), tensor dtype ('float32' or 'bfloat16')
    # and whether the raw (non-EMA) parameters are written next to the EMA ones.
    c.export = dict(dir="", dtype="float32", include_raw=False)
    # --mode=analyze: the optimal denoiser of the data's empirical distribution (jobs/analyze.py).
    # timesteps: explicit steps t; empty means num_timesteps steps evenly spaced over the chain.
    # held_out_queries: noisy queries from images outside the num_data images (else from them).
    c.analysis = dict(num_data=2048, num_queries=64, held_out_queries=True, timesteps=(),
                      num_timesteps=25, patch_sizes=(2, 4, 8), chunk_size=256)
    # Evaluation (SPEC 9): the converted TF-FID Inception weights (python -m
    # pdm_jax.cli.convert_inception), the reference batch or its statistics, sample counts.
    c.eval = dict(inception_path="", ref_path="", num_samples=50_000, batch_size=256)
    return c


def load_config(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file (configs/ is not a package), as absl would load it."""
    spec = importlib.util.spec_from_file_location(f"pdm_jax_config_{pathlib.Path(path).stem}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def unet_config(config: ml_collections.ConfigDict) -> UNetConfig:
    """The UNetConfig of a run config (model section)."""
    return UNetConfig.from_dict(config.model.to_dict())


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


#### Comparing configs ####


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
        out = {}
        for i, sub in enumerate(value):
            out.update(_flatten(sub, f"{prefix}[{i}]"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def dotted_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``['model.patch_size: 2 vs 4', ...]``: every dotted key whose values differ (a vs b)."""
    fa, fb = _flatten(json.loads(json.dumps(a))), _flatten(json.loads(json.dumps(b)))
    missing = "(absent)"
    keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k, missing) != fb.get(k, missing))
    return [f"{key}: {fa.get(key, missing)} vs {fb.get(key, missing)}" for key in keys]


def with_run_sections(config: ml_collections.ConfigDict, run_config: ml_collections.ConfigDict,
                      overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``config`` with the sections that define a run taken from the run's own config.

    Used by every mode but train: sampling or exporting a workdir trained with
    ``--config.model.patch_size=2`` needs no repeated overrides. Command-line overrides still
    win, key by key (a whole ``experts`` override replaces the run's list).

    Args:
      config: the config from the command line (file + overrides).
      run_config: ``WORKDIR/config.json`` of the run.
      overrides: the command line's ``--config.*`` overrides as {dotted key: value}.

    Returns:
      A new, unlocked ConfigDict.
    """
    merged = ml_collections.ConfigDict(config.to_dict())
    for section in RUN_SECTIONS:
        if section in run_config:
            if section == "experts":
                merged.experts = list(run_config.experts)
            else:
                merged[section] = ml_collections.ConfigDict(run_config[section].to_dict())
    merged.update_from_flattened_dict({k: v for k, v in overrides.items()
                                       if k.split(".")[0] in RUN_SECTIONS})
    return merged
