"""Loading a trained run's experts from its workdir: sampling, export, evaluation, warm starts.

Each loader opens one expert's checkpoints (``checkpointing.Checkpointer``, which refuses another
architecture's arrays) under the run's own config (``WORKDIR/config.json``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from pdm_jax import checkpointing
from pdm_jax.training.state import ExpertSetup, State, setup_expert


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``)."""
    path = epath.Path(workdir) / checkpointing.CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a pdm_jax training workdir.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def latest_expert_step(workdir: str, expert_name: str) -> int | None:
    """The newest committed step of one expert of a run, without opening orbax (None: none)."""
    directory = epath.Path(checkpointing.expert_checkpoint_dir(workdir, expert_name))
    if not directory.exists():
        return None
    steps = [int(p.name) for p in directory.iterdir()
             if p.name.isdigit() and checkpointing.is_complete_step(p)]
    return max(steps) if steps else None


def load_expert_state(workdir: str, expert_index: int, mesh: Mesh,
                      config: ml_collections.ConfigDict | None = None) -> tuple[State, int]:
    """The latest train state of one expert of the run in ``workdir``, sharded over ``mesh``.

    Args:
      workdir: training workdir.
      expert_index: which expert of that run's config.
      mesh: where to place the state.
      config: that run's config; read from ``WORKDIR/config.json`` when None.

    Returns:
      (state dict with 'params', 'ema', 'opt_state', 'step', 'rng'; its checkpoint step).

    Raises:
      FileNotFoundError: the expert has no checkpoint, naming it and the directory.
    """
    from pdm_jax.diffusion.experts import experts_from_config

    config = read_run_config(workdir) if config is None else config
    experts = experts_from_config(config)
    if not 0 <= expert_index < len(experts):
        raise ValueError(f"Expert {expert_index} does not exist in {workdir} "
                         f"({len(experts)} experts).")
    setup = setup_expert(experts[expert_index], mesh, config.seed + expert_index)
    directory = checkpointing.expert_checkpoint_dir(workdir, setup.name)
    if latest_expert_step(workdir, setup.name) is None:
        raise FileNotFoundError(
            f"No checkpoint for {setup.expert.describe()} under {directory}: train it first "
            f"(--mode=train, or --config.train.expert={expert_index} for this expert alone).")
    with checkpointing.Checkpointer(directory, signature=setup.signature) as ckpt:
        step = ckpt.latest_step()
        state, _ = ckpt.restore(setup.abstract, step)
    logging.info("Loaded %s from step %d", setup.expert.describe(), step)
    return state, step


def load_expert_ema(workdir: str, expert_index: int, mesh: Mesh,
                    config: ml_collections.ConfigDict | None = None) -> dict:
    """The latest EMA parameters of one expert of a run (see :func:`load_expert_state`)."""
    return load_expert_state(workdir, expert_index, mesh, config)[0]["ema"]


def warm_start(setup: ExpertSetup, state: State, workdir: str, mesh: Mesh) -> State:
    """``state`` with params and EMA set to another expert's latest EMA weights (SPEC 6).

    The source is expert ``warm_start_expert`` of ``warm_start_workdir`` (this run's workdir when
    empty); the optimiser state stays fresh.

    Raises:
      FileNotFoundError: the source has no checkpoint. ValueError: its architecture differs.
    """
    expert = setup.expert
    source_workdir = expert.warm_start_workdir or workdir
    source = load_expert_ema(source_workdir, expert.warm_start_expert, mesh)
    target = setup.abstract["params"]
    if jax.tree.map(lambda a: a.shape, source) != jax.tree.map(lambda a: a.shape, target):
        raise ValueError(f"Warm start of {expert.describe()} from expert "
                         f"{expert.warm_start_expert} of {source_workdir}: the architectures "
                         f"differ.")
    params = jax.tree.map(lambda s, a: jax.device_put(s, a.sharding), source, target)
    logging.info("Warm-started %s from expert %d of %s", expert.describe(),
                 expert.warm_start_expert, source_workdir)
    return {**state, "params": params, "ema": jax.tree.map(jnp.copy, params)}
