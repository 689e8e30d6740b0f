"""Config conventions shared by every file in configs/ (big_vision style), and validation.

A config file defines ``get_config(arg)``; ``arg`` is a typed argument string such as
``"patch=4,smoke"`` parsed once by :func:`parse_arg`. :func:`base_config` holds every section
with its defaults, so a config file states only what differs. :func:`validate` is the one
validation pass: every job calls it first, and it rejects bad values with a message naming
them before any model is built, any directory is created or anything compiles.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any, Mapping

import ml_collections
from absl import logging

from pdm_jax.diffusion import experts as experts_lib
from pdm_jax.diffusion import losses, samplers, schedules
from pdm_jax.models.unet import UNetConfig
from pdm_jax.training import state as state_lib

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


#### Validation ####


def _positive(config: ml_collections.ConfigDict, *keys: str) -> None:
    for dotted in keys:
        section, key = dotted.split(".")
        if config[section][key] <= 0:
            raise ValueError(f"{dotted} must be positive, got {config[section][key]}.")


def _divisible_by_devices(name: str, value: int) -> None:
    import jax

    devices = jax.device_count()
    if value % devices:
        raise ValueError(f"{name}={value} must be a multiple of the {devices} devices (every "
                         f"device takes an equal share of a batch).")


def _check_path(name: str, path: str, hint: str) -> None:
    from etils import epath

    if not path:
        raise ValueError(f"{name} is empty; {hint}.")
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{name}={path!r} does not exist; {hint}.")


def _check_writable(name: str, path: str) -> None:
    """The nearest existing ancestor of a local ``path`` must be a writable directory."""
    if "://" in path:
        return  # object stores: permissions show on the first write
    probe = pathlib.Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{name}={path!r} is not writable ({probe} is not a writable "
                              f"directory).")


def _check_eval_paths(config: ml_collections.ConfigDict, needs_ref: bool, purpose: str) -> None:
    from pdm_jax.evaluation import npz_stats

    e = config.eval
    _check_path("eval.inception_path", e.inception_path,
                "convert the weights once with `python -m pdm_jax.cli.convert_inception "
                "--out=PATH`, then pass --config.eval.inception_path=PATH")
    _divisible_by_devices("eval.batch_size", e.batch_size)
    if needs_ref:
        _check_path("eval.ref_path", e.ref_path,
                    f"{purpose} needs a reference batch: an ADM one (e.g. "
                    f"VIRTUAL_imagenet256_labeled.npz) or one written by --mode=ref_stats")
        npz_stats.describe(e.ref_path)  # raises for a file without images or statistics


def _check_analysis(config: ml_collections.ConfigDict) -> None:
    a = config.analysis
    for key in ("num_data", "num_queries", "chunk_size", "num_timesteps"):
        if int(a[key]) < 1:
            raise ValueError(f"analysis.{key} must be >= 1, got {a[key]}.")
    if a.num_queries > a.num_data and not a.held_out_queries:
        raise ValueError(f"analysis.num_queries={a.num_queries} exceeds analysis.num_data="
                         f"{a.num_data} (in-sample queries are made from data images).")
    for p in a.patch_sizes:
        if p < 1 or config.data.image_size % p:
            raise ValueError(f"analysis.patch_sizes has {p}, which does not divide "
                             f"data.image_size={config.data.image_size}.")
    bad = [t for t in a.timesteps if not 0 <= int(t) < config.diffusion.num_timesteps]
    if bad:
        raise ValueError(f"analysis.timesteps has {bad} outside [0, "
                         f"{config.diffusion.num_timesteps}).")


def _check_checkpoints(config: ml_collections.ConfigDict, workdir: str, mode: str) -> None:
    from pdm_jax import checkpointing

    for expert in experts_lib.experts_from_config(config):
        if checkpointing.latest_expert_step(workdir, expert.name) is None:
            raise FileNotFoundError(
                f"--mode={mode}: {expert.describe()} has no checkpoint under "
                f"{checkpointing.expert_checkpoint_dir(workdir, expert.name)}; train it first "
                f"(--mode=train) or point --workdir at a trained run.")


def validate(config: ml_collections.ConfigDict, mode: str = "train",
             workdir: str | None = None) -> None:
    """The one validation pass of a run: raises naming the first bad value.

    Runs before any model is built, any directory is created or anything compiles: config
    values, device divisibility, the dataset (present and readable), input and output paths,
    and for modes that read a trained run, its checkpoints.

    Args:
      config: the run config.
      mode: the job about to run (one of :data:`MODES`).
      workdir: the run directory (checked for the modes that read or write one).

    Raises:
      ValueError / FileNotFoundError / PermissionError: naming the value and what was expected.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")
    if mode == "prepare_data":
        # Only the data section matters (the job may run on a CPU host, whatever the mesh).
        import jax

        from pdm_jax.data import datasets
        if jax.process_count() > 1:
            raise ValueError(
                f"--mode=prepare_data runs as ONE process ({jax.process_count()} were started): "
                f"run it on one host (launch/tpu.sh prepare_data uses worker 0 with JAX on "
                f"the CPU), then train with the same data.data_dir.")
        if config.data.name == datasets.FOLDER_NAME:
            raise ValueError(f"--mode=prepare_data prepares tfds datasets; data.name='folder' "
                             f"reads data.folder={config.data.folder!r} directly (nothing to "
                             f"prepare).")
        datasets.check_available(config.data)
        return
    experts = experts_lib.experts_from_config(config)
    for expert in experts:
        expert.model.validate()
        state_lib.learning_rate_schedule(expert.optim)
    model = experts[0].model
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
    for key in ("sample.steps", "train.grid_steps", "train.fid_steps"):
        section, name = key.split(".")
        schedules.respace_timesteps(config[section][name], d.num_timesteps)
    if config.sample.sampler not in samplers.SAMPLERS:
        raise ValueError(f"Unknown sample.sampler {config.sample.sampler!r}; expected one of "
                         f"{samplers.SAMPLERS}.")
    _positive(config, "train.num_steps", "train.batch_size", "train.log_every", "ckpt.every",
              "ckpt.keep", "sample.batch_size", "sample.num_samples", "eval.batch_size")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}.")
    if not 0.0 <= config.train.label_dropout < 1.0:
        raise ValueError(f"train.label_dropout must be in [0, 1), got "
                         f"{config.train.label_dropout}.")
    from pdm_jax import sharding
    sharding.resolve_mesh_shape(tuple(config.mesh.shape))

    if mode == "train":
        patched = sorted({e.model.patch_size for e in experts if e.model.patch_size > 1})
        if d.parameterization == "eps" and patched:
            # Measured (README, "Training objectives"): eps outputs of patched U-Nets stay
            # texture for thousands of steps and draw colour casts; x0 (or v) is the robust
            # choice, as the PDM paper argues. The authors' own code does the same.
            logging.warning(
                "diffusion.parameterization='eps' with patch size %s: predicting the noise is "
                "fragile for patched models (texture, colour casts); every released PDM recipe "
                "predicts x0 ('x0', or 'v').", patched)
        t = config.train
        if not -1 <= t.expert < len(experts):
            raise ValueError(f"train.expert={t.expert} is out of range: this config has "
                             f"{len(experts)} expert(s) (-1 trains all).")
        _divisible_by_devices("train.batch_size", t.batch_size)
        if t.fid_every < 0:
            raise ValueError(f"train.fid_every must be >= 0 (0: off), got {t.fid_every}.")
        if t.fid_every > 0:
            _check_eval_paths(config, True, f"train.fid_every={t.fid_every}")
            if t.fid_num_samples < 2:
                raise ValueError(f"train.fid_num_samples must be >= 2, got {t.fid_num_samples}.")
    elif mode in ("sample",):
        _divisible_by_devices("sample.batch_size", config.sample.batch_size)
    elif mode == "eval":
        _check_eval_paths(config, True, "--mode=eval")
        if config.eval.num_samples < 2:
            raise ValueError(f"eval.num_samples must be >= 2, got {config.eval.num_samples}.")
    elif mode == "ref_stats":
        _check_eval_paths(config, False, "--mode=ref_stats")
    elif mode == "export":
        if config.export.dtype not in EXPORT_DTYPES:
            raise ValueError(f"Unknown export.dtype {config.export.dtype!r}; expected one of "
                             f"{EXPORT_DTYPES}.")
        if "://" in config.export.dir:
            raise ValueError(f"export.dir={config.export.dir!r}: exports are written to local "
                             f"paths; copy the directory to remote storage afterwards.")
    elif mode == "analyze":
        _check_analysis(config)

    if mode in ("train", "ref_stats", "analyze"):
        from pdm_jax.data import datasets
        data = config.data
        if mode == "analyze":  # reads images only (jobs/analyze.py drops the labels)
            data = dict(data.to_dict(), class_conditional=False)
        data_classes = datasets.check_available(data)
        if mode == "train" and config.data.class_conditional and data_classes > model.num_classes:
            # Labels >= num_classes would be the null label or embed as NaN.
            raise ValueError(f"data {config.data.name!r} has {data_classes} classes but "
                             f"model.num_classes={model.num_classes}; set model.num_classes >= "
                             f"{data_classes}.")
    if workdir is not None:
        if mode in ("sample", "eval", "export"):
            _check_checkpoints(config, workdir, mode)
        _check_writable("--workdir", workdir)
        if mode == "export" and config.export.dir:
            _check_writable("export.dir", config.export.dir)

