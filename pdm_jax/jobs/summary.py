"""``--mode=summary``: per model, patch size, SNR interval, parameters and GMACs per forward."""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pdm_jax import config_validation, io as io_lib
from pdm_jax.diffusion.experts import experts_from_config, sampling_steps_per_expert
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.models.flops import count_macs
from pdm_jax.models.unet import UNetConfig, abstract_model


def forward_macs(unet: UNetConfig, model: tuple[Any, Any] | None = None) -> int:
    """Multiply-accumulates of one U-Net forward on one image, by abstract evaluation.

    Args:
      unet: the U-Net's config.
      model: ``abstract_model(unet)`` when the caller already has it.

    Returns:
      The MACs of its convolutions and matmuls (``models.flops.count_macs``).
    """
    graphdef, state = model or abstract_model(unet)
    x = jax.ShapeDtypeStruct((1, unet.image_size, unet.image_size, unet.in_channels),
                             jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if unet.num_classes else None
    return count_macs(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y), state, x, t, y)


def summarize(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
    """Builds the summary by abstract evaluation (no weights, no compile) and writes it.

    Args:
      config: run config.
      workdir: if given, ``summary.json`` is written there.

    Returns:
      ``{"experts": [{"snr_interval", "patch_size", "image_size", "params",
      "gmacs_per_forward", "sampling_steps", "warm_start"}], "sample_steps"}``; sampling_steps
      counts the steps of ``sample.steps`` each expert runs. In ``summary.json`` an unbounded
      SNR end is written as ``null`` (strict JSON has no Infinity).
    """
    config_validation.validate(config, "summary")
    experts = experts_from_config(config)
    d = config.diffusion
    respaced = Schedule.from_name(d.schedule, d.num_timesteps).respace(config.sample.steps)
    steps = sampling_steps_per_expert(experts, respaced)
    rows = []
    for expert, num_steps in zip(experts, steps):
        unet = expert.model
        graphdef, state = abstract_model(unet)
        macs = forward_macs(unet, (graphdef, state))
        lo, hi = expert.snr_interval
        rows.append({"snr_interval": [lo, hi], "patch_size": unet.patch_size,
                     "image_size": unet.image_size,
                     "params": sum(int(a.size) for a in jax.tree.leaves(state)),
                     "gmacs_per_forward": round(macs / 1e9, 3), "sampling_steps": num_steps,
                     "warm_start": ({"workdir": expert.warm_start_workdir,
                                     "expert": expert.warm_start_expert}
                                    if expert.warm_start_expert >= 0 else None)})
    summary = {"experts": rows, "sample_steps": config.sample.steps}
    if workdir and jax.process_index() == 0:
        io_lib.write_atomic(f"{workdir}/summary.json",
                            json.dumps(_strict_json(summary), indent=2, allow_nan=False))
    return summary


def _strict_json(value: Any) -> Any:
    """``value`` with every infinite float replaced by None, so it serialises as strict JSON."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def format_table(summary: dict) -> str:
    """A fixed-width text table of the summary."""
    header = f"{'expert':>6} {'SNR interval':>20} {'P':>3} {'image':>6} {'params (M)':>11} " \
             f"{'GMACs/fwd':>10} {'steps':>6}"
    rows = [header, "-" * len(header)]
    for i, e in enumerate(summary["experts"]):
        lo, hi = e["snr_interval"]
        rows.append(f"{i:>6} {f'({lo:g}, {hi:g}]':>20} {e['patch_size']:>3} "
                    f"{e['image_size']:>6} {e['params'] / 1e6:>11.2f} "
                    f"{e['gmacs_per_forward']:>10.2f} {e['sampling_steps']:>6}")
    return "\n".join(rows)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``--mode=summary``: prints the table and writes ``WORKDIR/summary.json``."""
    result = summarize(config, workdir)
    print(format_table(result))
    return result
