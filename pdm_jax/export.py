"""``--mode=export``: a training workdir's latest checkpoints -> a standalone export.

Restores every expert's latest train state (orbax, via sample.load_expert_state) and writes
its EMA parameters (and, with ``export.include_raw``, the raw ones) as safetensors in
``export.dtype``, with model.json and a model card (export_format.py). The export is then
loaded by ``pdm_jax.Pipeline`` without orbax or TensorFlow.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from pdm_jax import config_lib, export_format, sample, sharding
from pdm_jax.experts import experts_from_config


def run(config: ml_collections.ConfigDict, workdir: str, export_dir: str | None = None) -> str:
    """Exports the run in ``workdir`` (trained with ``config``).

    Args:
      config: the run config (architecture must match the checkpoints; export section read).
      workdir: training workdir (local path).
      export_dir: destination; default ``<workdir>/export``.

    Returns:
      The export directory.

    Raises:
      ValueError: bad export.dtype or a non-local path, before any checkpoint is read.
      FileNotFoundError: an expert without a checkpoint.
    """
    config_lib.validate(config)
    dtype = export_format.check_dtype(config.export.dtype)
    export_dir = export_dir or os.path.join(workdir, "export")
    if "://" in export_dir:
        raise ValueError(f"--export_dir={export_dir!r}: exports are written to local paths; "
                         f"copy the directory to remote storage afterwards.")
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    params, steps = [], []
    for expert in experts_from_config(config):
        state, step = sample.load_expert_state(workdir, expert.index, mesh, config)
        kinds = {"ema": "ema", "raw": "params"} if config.export.include_raw else {"ema": "ema"}
        # Every process gathers the full arrays (FSDP shards may live on other hosts).
        params.append({kind: multihost_utils.process_allgather(state[key], tiled=True)
                       for kind, key in kinds.items()})
        steps.append(step)
    if jax.process_index() == 0:
        export_format.write_export(
            export_dir, config, params, steps, dtype=dtype,
            source={"workdir": os.path.abspath(workdir)},
            card_notes=f"Exported with `--mode=export` from a pdm_jax run "
                       f"({len(steps)} expert(s), steps {steps}).")
        logging.info("Exported %d expert(s) (%s, raw=%s) at steps %s to %s", len(steps), dtype,
                     bool(config.export.include_raw), steps, export_dir)
    return export_dir
