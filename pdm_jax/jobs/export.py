"""``--mode=export``: a training workdir's latest checkpoints -> a standalone export.

Restores every expert's latest train state and writes its EMA parameters (and, with
``export.include_raw``, the raw ones) as safetensors in ``export.dtype``, with model.json and a
model card (export_format.py), into ``export.dir`` (default ``WORKDIR/export``). The export is
then loaded by ``pdm_jax.Pipeline`` without orbax or TensorFlow.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from pdm_jax import config_validation, export_format, run_loading, sharding
from pdm_jax.diffusion.experts import experts_from_config


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Exports the run in ``workdir`` (trained with ``config``); returns the export directory."""
    config_validation.validate(config, "export", workdir)
    export_dir = config.export.dir or os.path.join(workdir, "export")
    mesh = sharding.make_mesh(config.mesh.shape)
    kinds = {"ema": "ema", "raw": "params"} if config.export.include_raw else {"ema": "ema"}
    params, steps = [], []
    for expert in experts_from_config(config):
        state, step = run_loading.load_expert_state(workdir, expert.index, mesh, config)
        # Every process gathers the full arrays (FSDP shards may live on other hosts).
        params.append({kind: multihost_utils.process_allgather(state[key], tiled=True)
                       for kind, key in kinds.items()})
        steps.append(step)
    if jax.process_index() == 0:
        export_format.write_export(
            export_dir, config, params, steps, dtype=config.export.dtype,
            source={"workdir": os.path.abspath(workdir)},
            card_notes=f"Exported with `--mode=export` from a pdm_jax run "
                       f"({len(steps)} expert(s), steps {steps}).")
        logging.info("Exported %d expert(s) (%s, raw=%s) at steps %s to %s", len(steps),
                     config.export.dtype, bool(config.export.include_raw), steps, export_dir)
    return export_dir
