"""The export format: per-expert safetensors + one model.json + a model card (README.md).

Layout of an export directory::

    model.json                     format version, full run config, config hash, experts
                                   (index, name, SNR interval, U-Net config, step, files)
    README.md                      model card: what was trained, how, how to sample it
    <expert name>.ema.safetensors  EMA parameters, keys '/'-joined NNX paths
    <expert name>.raw.safetensors  raw (non-EMA) parameters, only with export.include_raw

This module imports neither TensorFlow nor orbax: it is the loading side of the standalone
inference API. Directories are local paths (written atomically: temp dir renamed at the end).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from flax import nnx

from pdm_jax.config_lib import EXPORT_DTYPES
from pdm_jax.diffusion.experts import Expert, experts_from_config
from pdm_jax.models.unet import UNet, UNetConfig
from pdm_jax.training.state import param_shapes

FORMAT = "pdm_jax.export"
VERSION = 1
MODEL_JSON = "model.json"
MODEL_CARD = "README.md"
KINDS = ("ema", "raw")


def check_dtype(dtype: str) -> str:
    """Returns ``dtype`` if it is an export dtype; raises ValueError naming the choices."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"Unknown export dtype {dtype!r}; expected one of {EXPORT_DTYPES}.")
    return dtype


def config_hash(config: ml_collections.ConfigDict) -> str:
    """sha256 (16 hex digits) of the run config's canonical JSON, without its export section.

    Exports of one run in another dtype (or with raw parameters) therefore share the hash.
    """
    values = json.loads(config.to_json_best_effort(sort_keys=True))
    values.pop("export", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def expected_params(model: UNetConfig) -> dict[str, tuple[tuple, tuple[int, ...]]]:
    """{'/'-joined key: (NNX path, shape)} of every parameter of a U-Net, built abstractly."""
    return {param_key(path): (path, shape)
            for path, shape in param_shapes(model).items()}


def param_key(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
    """NNX pure dict -> {'/'-joined key: numpy array} (the safetensors tensors)."""
    return {param_key(path): np.asarray(value)
            for path, value in nnx.traversals.flatten_mapping(params).items()}


def tensor_file(expert_name: str, kind: str) -> str:
    return f"{expert_name}.{kind}.safetensors"


#### Writing ####


def write_export(out_dir: str, config: ml_collections.ConfigDict,
                 params: Sequence[Mapping[str, Mapping]], steps: Sequence[int], *, dtype: str,
                 source: Mapping[str, Any], card_notes: str = "") -> str:
    """Writes an export directory atomically (a temporary sibling renamed at the end).

    Args:
      out_dir: local destination; an existing export there is replaced, any other non-empty
        directory is refused.
      config: the run config (its experts define the files).
      params: per expert in config order, {'ema': pure dict} and optionally 'raw'.
      steps: per expert, the training step of its parameters.
      dtype: 'float32' or 'bfloat16' for every tensor.
      source: where the weights came from (workdir, or PyTorch checkpoint files), recorded.
      card_notes: extra lines for the model card.

    Returns:
      ``out_dir``.

    Raises:
      ValueError: bad dtype, wrong count of experts, or parameters not matching the config.
      FileExistsError: ``out_dir`` is a non-empty directory that is not an export.
    """
    check_dtype(dtype)
    experts = experts_from_config(config)
    if len(params) != len(experts) or len(steps) != len(experts):
        raise ValueError(f"Got parameters for {len(params)} experts and {len(steps)} steps, "
                         f"but the config has {len(experts)} experts.")
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(
            os.path.join(out_dir, MODEL_JSON)):
        raise FileExistsError(f"{out_dir} exists and is not a pdm_jax export; refusing to "
                              f"replace it (choose another --export_dir).")
    np_dtype = _numpy_dtype(dtype)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        entries, checksums = [], {}
        for expert, expert_params, step in zip(experts, params, steps):
            if "ema" not in expert_params:
                raise ValueError(f"No 'ema' parameters given for {expert.describe()}.")
            files = {}
            for kind in KINDS:
                if kind not in expert_params:
                    continue
                tensors = flatten_params(expert_params[kind])
                check_tensors(f"{expert.describe()} {kind}", tensors, expert.model)
                files[kind] = tensor_file(expert.name, kind)
                data = safetensors.numpy.save(
                    {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()},
                    metadata={"format": FORMAT, "expert": expert.name, "kind": kind,
                              "step": str(int(step))})
                with open(os.path.join(tmp, files[kind]), "wb") as f:
                    f.write(data)
                checksums[files[kind]] = hashlib.sha256(data).hexdigest()
            entries.append(_expert_entry(expert, int(step), files,
                                         sum(v.size for v in tensors.values())))
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype,
                "step": max(int(s) for s in steps), "config_hash": config_hash(config),
                "num_classes": experts[0].model.num_classes,
                "image_size": experts[0].model.image_size,
                "diffusion": config.diffusion.to_dict(), "experts": entries,
                "source": dict(source), "sha256": checksums,
                "config": json.loads(config.to_json_best_effort(sort_keys=True))}
        with open(os.path.join(tmp, MODEL_JSON), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, MODEL_CARD), "w") as f:
            f.write(model_card(meta, config, card_notes))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _numpy_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes  # a JAX dependency; numpy has no bfloat16 of its own
        return ml_dtypes.bfloat16
    return np.float32


def _expert_entry(expert: Expert, step: int, files: dict[str, str], num_params: int) -> dict:
    return {"index": expert.index, "name": expert.name,
            "snr_interval": list(expert.snr_interval), "model": dataclasses.asdict(expert.model),
            "step": step, "files": files, "num_params": int(num_params)}


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Renames ``tmp`` to ``out_dir``; a previous export there is moved aside, then deleted."""
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _lr_schedule_words(optim: ml_collections.ConfigDict) -> str:
    words = f"warmup {optim.warmup_steps}"
    if optim.get("schedule", "constant") == "cosine":
        words += f", cosine decay to {optim.final_lr:g} at step {optim.decay_steps}"
    return words


def model_card(meta: Mapping[str, Any], config: ml_collections.ConfigDict, notes: str) -> str:
    """A short Markdown model card: data, architecture, diffusion, training, experts, usage."""
    c = config
    classes = meta["num_classes"]
    conditioning = (f"{classes} classes, classifier-free guidance (label dropout "
                    f"{c.train.label_dropout:g})" if classes else "unconditional")
    lines = [
        "# pdm_jax export", "",
        "A Patched Diffusion Model (timestep-split ensemble of PDM U-Nets) exported by pdm_jax.",
        "",
        f"- Data: `{c.data.name}` at {c.data.image_size}x{c.data.image_size}, {conditioning}.",
        f"- Diffusion: {c.diffusion.schedule} schedule, T={c.diffusion.num_timesteps}, "
        f"{c.diffusion.parameterization} parameterisation, {c.diffusion.weighting} weighting.",
        f"- Training: step {meta['step']}, batch {c.train.batch_size}, Adam lr {c.optim.lr:g} "
        f"({_lr_schedule_words(c.optim)}), EMA decay {c.train.ema_decay:g}.",
        f"- Weights: {meta['dtype']}; config hash `{meta['config_hash']}`; "
        f"source: {json.dumps(meta['source'])}.",
        "", "| expert | SNR interval | patch | widths | parameters | step |",
        "|---|---|---|---|---|---|"]
    for e in meta["experts"]:
        lo, hi = e["snr_interval"]
        widths = [int(e["model"]["model_channels"] * m) for m in e["model"]["channel_mult"]]
        lines.append(f"| {e['index']} `{e['name']}` | ({lo:g}, {hi:g}] | "
                     f"{e['model']['patch_size']} | {widths} | {e['num_params']:,} | "
                     f"{e['step']} |")
    if notes.strip():
        lines += ["", notes.strip()]
    lines += ["", "Sample it:", "", "```",
              "python -m pdm_jax.cli.sample_export --export_dir=. --num=16 --out=grid.png",
              "```", "", "or in Python: `pdm_jax.Pipeline.load(dir).sample(16, seed=0)`.", ""]
    return "\n".join(lines)


#### Reading and validation ####


def read_meta(export_dir: str) -> dict:
    """The parsed ``model.json`` of an export; clear errors if it is absent or not ours."""
    path = os.path.join(export_dir, MODEL_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {export_dir} is not a pdm_jax export "
                                f"(create one with --mode=export or pdm_jax.cli.import_torch).")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} has format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}.")
    return meta


def check_tensors(what: str, shapes: Mapping[str, Any], model: UNetConfig) -> None:
    """Refuses tensors that do not match ``model``, naming the first mismatching key.

    Args:
      what: names the file or expert in the message.
      shapes: key -> array or shape tuple.
      model: the U-Net the tensors must fill exactly.

    Raises:
      ValueError: the first key (in sorted order) that is missing, unexpected or misshapen.
    """
    expected = expected_params(model)
    for key in sorted(set(expected) | set(shapes)):
        if key not in shapes:
            raise ValueError(f"{what}: missing tensor {key!r} (shape {expected[key][1]}) that "
                             f"the config's U-Net needs.")
        if key not in expected:
            raise ValueError(f"{what}: unexpected tensor {key!r}, which the config's U-Net "
                             f"does not have.")
        shape = tuple(getattr(shapes[key], "shape", shapes[key]))
        if shape != expected[key][1]:
            raise ValueError(f"{what}: tensor {key!r} has shape {shape}, the config's U-Net "
                             f"expects {expected[key][1]}.")


def read_params(path: str, model: UNetConfig) -> dict:
    """Loads one safetensors file as an NNX pure dict of float32 numpy arrays for ``model``.

    Shapes and keys are checked from the header before any tensor is read.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a corrupted/truncated file (naming it), or tensors not matching ``model``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Export file {path} does not exist.")
    expected = expected_params(model)
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            check_tensors(path, shapes, model)
            flat = {expected[key][0]: f.get_tensor(key).astype(np.float32) for key in shapes}
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): "
                         f"{e}") from e
    return nnx.traversals.unflatten_mapping(flat)


def _check_checksum(path: str, expected: str | None) -> None:
    """Catches bit-level corruption that leaves the safetensors header intact."""
    if expected is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path} is corrupted: its sha256 {digest.hexdigest()[:16]}... differs "
                         f"from the {expected[:16]}... recorded in {MODEL_JSON}.")


def read_export(export_dir: str, kind: str = "ema") -> tuple[dict, ml_collections.ConfigDict,
                                                              list[dict]]:
    """Reads and validates an export.

    Args:
      export_dir: directory written by :func:`write_export`.
      kind: 'ema' (default) or 'raw' parameters.

    Returns:
      (model.json contents, run config, per-expert float32 NNX pure dicts in config order).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown parameter kind {kind!r}; expected one of {KINDS}.")
    meta = read_meta(export_dir)
    config = ml_collections.ConfigDict(meta["config"])
    experts = experts_from_config(config)
    if len(experts) != len(meta["experts"]):
        raise ValueError(f"{export_dir}/{MODEL_JSON} lists {len(meta['experts'])} experts but "
                         f"its config defines {len(experts)}.")
    params = []
    for expert, entry in zip(experts, meta["experts"]):
        if kind not in entry["files"]:
            raise ValueError(f"{export_dir} has no {kind!r} parameters for {expert.describe()} "
                             f"(export with export.include_raw=True to get raw parameters).")
        path = os.path.join(export_dir, entry["files"][kind])
        params.append(read_params(path, expert.model))
        _check_checksum(path, meta.get("sha256", {}).get(entry["files"][kind]))
    return meta, config, params


#### Importing the authors' PyTorch checkpoints ####


def export_torch_checkpoints(config: ml_collections.ConfigDict, checkpoints: Sequence[str],
                             out: str, dtype: str | None = None) -> str:
    """Converts one PyTorch state_dict per expert into an export at ``out``.

    Args:
      config: a run config whose experts' U-Nets match the checkpoints.
      checkpoints: .pt paths in the config's expert order.
      out: export directory (written atomically).
      dtype: 'float32' / 'bfloat16'; default ``config.export.dtype``.

    Returns:
      ``out``.

    Raises:
      ValueError: wrong number of files, unreadable files, or keys/shapes not matching the
        config, naming the file and the first offending key.
    """
    from pdm_jax.models.torch_import import load_torch_state_dict, read_torch_state_dict

    dtype = check_dtype(dtype or config.export.dtype)
    experts = experts_from_config(config)
    if len(checkpoints) != len(experts):
        raise ValueError(f"Got {len(checkpoints)} checkpoint(s) {list(checkpoints)} for "
                         f"{len(experts)} expert(s): pass one .pt per expert, in config order.")
    params = []
    for expert, path in zip(experts, checkpoints):
        state_dict = read_torch_state_dict(path)
        model = nnx.eval_shape(lambda e=expert: UNet(e.model, rngs=nnx.Rngs(0)))
        try:
            load_torch_state_dict(model, state_dict)
        except ValueError as e:
            raise ValueError(f"{path} does not fit {expert.describe()}: {e}") from e
        params.append({"ema": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
        logging.info("Imported %s for %s", path, expert.describe())
    return write_export(
        out, config, params, [0] * len(experts), dtype=dtype,
        source={"pytorch_checkpoints": [os.path.abspath(p) for p in checkpoints]},
        card_notes="Imported from PyTorch checkpoints of the authors' implementation "
                   "(`python -m pdm_jax.cli.import_torch`); the step is unknown and recorded as 0.")
