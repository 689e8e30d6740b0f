"""``--mode=eval``: FID/sFID/IS/precision/recall of the EMA experts' samples (SPEC 9).

Samples ``eval.num_samples`` images with the EMA experts (``sample`` section: sampler, steps,
guidance, eta, seed), scores them against ``eval.ref_path`` (evaluation/scorer.py) and writes
the metrics to ``WORKDIR/eval/<sampler><steps>_w<w>_eta<eta>_n<N>_<ref>.json``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from pdm_jax import config_validation, io as io_lib, run_loading, sharding, writers
from pdm_jax.diffusion.experts import experts_from_config
from pdm_jax.evaluation import report, scorer


def eval_name(config: ml_collections.ConfigDict) -> str:
    """``<sampler><steps>_w<guidance>_eta<eta>_n<num>_<ref file stem>``."""
    s = config.sample
    ref = os.path.splitext(os.path.basename(config.eval.ref_path))[0]
    return (f"{s.sampler}{s.steps}_w{s.guidance_scale:g}_eta{s.eta:g}_n{config.eval.num_samples}"
            f"_{ref}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Scores the run in ``workdir``; returns the metrics written to its eval/ JSON."""
    config_validation.validate(config, "eval", workdir)
    e, s = config.eval, config.sample
    mesh = sharding.make_mesh(config.mesh.shape)
    progress = writers.ReportProgress(num_steps=math.ceil(e.num_samples / e.batch_size),
                                      items_per_step=e.batch_size, what="batch", every_steps=1)
    progress(0)
    score = scorer.make_scorer(config, mesh, num_samples=e.num_samples, steps=s.steps,
                               on_batch=progress)
    emas = [run_loading.load_expert_ema(workdir, x.index, mesh, config)
            for x in experts_from_config(config)]
    result = score(emas)
    logging.info("Eval (%s, steps=%s, w=%g, eta=%g, %d samples vs %s):\n%s", s.sampler, s.steps,
                 s.guidance_scale, s.eta, e.num_samples, e.ref_path,
                 report.format_metrics(result))
    if jax.process_index() == 0:
        path = f"{workdir}/eval/{eval_name(config)}.json"
        io_lib.write_json(path, result)
        logging.info("Wrote %s", path)
    return result
