"""The one validation pass of a run: every job calls :func:`validate` first.

It rejects bad values with a message naming them and what was expected before any model is built,
any directory is created or anything compiles (data present, paths writable, checkpoints there).
"""

from __future__ import annotations

import os
import pathlib

import ml_collections
from absl import logging

from pdm_jax.config_lib import EXPORT_DTYPES, MODES
from pdm_jax.diffusion import experts as experts_lib
from pdm_jax.diffusion import losses, samplers, schedules
from pdm_jax.training import state as state_lib


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
    from pdm_jax import checkpointing, run_loading

    for expert in experts_lib.experts_from_config(config):
        if run_loading.latest_expert_step(workdir, expert.name) is None:
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

