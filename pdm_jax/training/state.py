"""The train state of each expert: optimiser, EMA, sharded creation, and one per-expert setup.

The state is a plain dict pytree so that optax, orbax and jit shardings all see the same tree:
``{'params', 'opt_state', 'ema', 'step', 'rng'}``; params and EMA are NNX pure dicts merged
into the U-Net graph inside jit (``nnx.merge(graphdef, params)``).

:func:`setup_experts` is the one place where an expert's optimiser, graph, abstract state and
shardings are assembled; training, the checkpoint loaders, the tests and the benchmarks all use
it, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from pdm_jax import sharding
from pdm_jax.diffusion.experts import Expert, experts_from_config
from pdm_jax.models.unet import UNet, UNetConfig

State = dict[str, Any]


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to ``optim.lr`` over ``optim.warmup_steps`` (SPEC 7), then the decay.

    Args:
      optim: the optim section. ``schedule='constant'`` (the released recipes) holds ``lr``
        after the warmup; ``'cosine'`` decays it to ``final_lr`` along half a cosine that ends at
        step ``decay_steps`` (counted from step 0, warmup included) and stays there.

    Returns:
      An optax schedule of the global step.

    Raises:
      ValueError: an unknown schedule, or a cosine whose decay_steps does not exceed the warmup.
    """
    schedule = optim.get("schedule", "constant")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown optim.schedule {schedule!r}; expected one of {LR_SCHEDULES}.")
    warmup = max(int(optim.warmup_steps), 0)
    if schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(optim.lr)
        return optax.linear_schedule(0.0, optim.lr, warmup)
    decay_steps = int(optim.get("decay_steps", 0))
    if decay_steps <= warmup:
        raise ValueError(f"optim.schedule='cosine' needs optim.decay_steps > optim.warmup_steps "
                         f"(={warmup}): the step where the decay ends, e.g. train.num_steps; "
                         f"got {decay_steps}.")
    final_lr = float(optim.get("final_lr", 0.0))
    if not 0.0 <= final_lr <= optim.lr:
        raise ValueError(f"optim.final_lr={final_lr} must lie in [0, optim.lr={optim.lr}].")
    # The warmup ends exactly at lr, which is where the cosine starts, so the schedule is
    # continuous; past decay_steps the cosine schedule returns final_lr.
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, decay_steps, final_lr)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam(W) with linear warmup and optional global-norm clipping.

    Args:
      optim: the config's optim section (lr, warmup_steps, b1, b2, eps, weight_decay, grad_clip).

    Returns:
      An optax transformation; the clipping stage is present only when grad_clip > 0, which is
      why grad_clip's on/off is part of the checkpoint signature.
    """
    adam = optax.adamw(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay)
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam)
    return adam


@functools.lru_cache(maxsize=32)
def _abstract_unet(unet_config: UNetConfig) -> tuple[nnx.GraphDef, dict[tuple, tuple[int, ...]]]:
    # Cached: tracing the U-Net's construction takes seconds on a busy CPU.
    model = nnx.eval_shape(lambda: UNet(unet_config, rngs=nnx.Rngs(0)))
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return nnx.split(model)[0], {path: tuple(v.shape) for path, v in flat.items()}


def model_graphdef(unet_config: UNetConfig) -> nnx.GraphDef:
    """The static graph of the U-Net (no weights allocated)."""
    return _abstract_unet(unet_config)[0]


def param_shapes(unet_config: UNetConfig) -> dict[tuple, tuple[int, ...]]:
    """{NNX parameter path: shape} of the U-Net's parameters (no weights allocated)."""
    return dict(_abstract_unet(unet_config)[1])


def init_params(unet_config: UNetConfig, rng: jax.Array) -> dict:
    """Freshly initialised U-Net parameters as an NNX pure dict."""
    return nnx.to_pure_dict(nnx.state(UNet(unet_config, rngs=nnx.Rngs(rng)), nnx.Param))


def _init_state(unet_config: UNetConfig, tx: optax.GradientTransformation, seed: int) -> State:
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(unet_config, init_rng)
    return {"params": params, "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params), "step": jnp.zeros((), jnp.int32),
            "rng": train_rng}


@functools.lru_cache(maxsize=16)
def _jitted_init(model: UNetConfig, optim_json: str, seed: int, mesh: Mesh) -> Any:
    """The jitted initialiser of one expert's state; one per setting in a process, so creating
    the same state again (a test, a sweep) neither traces nor compiles again."""
    tx = make_optimizer(ml_collections.ConfigDict(json.loads(optim_json)))
    abstract = jax.eval_shape(lambda: _init_state(model, tx, seed))
    return jax.jit(lambda: _init_state(model, tx, seed),
                   out_shardings=sharding.param_shardings(abstract, mesh))


def checkpoint_signature(expert: Expert) -> dict[str, Any]:
    """What an expert's checkpoint arrays depend on: the U-Net and the optimiser state layout.

    Schedules, step counts, logging and sampling settings may change across a resume; these may
    not. A checkpoint stores this dict and a restore under another one names the keys that differ.
    """
    return {"model": json.loads(json.dumps(dataclasses.asdict(expert.model))),
            "optim": {"grad_clip": bool(expert.optim.grad_clip)}}


def fingerprint(signature: dict[str, Any]) -> str:
    """16 hex digits identifying a checkpoint signature."""
    blob = json.dumps(signature, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ExpertSetup:
    """What training, restoring or sampling one expert needs; nothing is allocated.

    Attributes:
      expert: the ensemble member.
      tx: its optimiser.
      graphdef: its U-Net graph.
      abstract: its abstract state: ShapeDtypeStructs carrying the shardings on ``mesh``.
      shardings: the NamedSharding tree of the state (FSDP rules over ``mesh``).
      seed: initialisation seed (the run's seed + the expert's index).
    """

    expert: Expert
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef
    abstract: State
    shardings: State
    seed: int

    @property
    def name(self) -> str:
        return self.expert.name

    @property
    def signature(self) -> dict[str, Any]:
        return checkpoint_signature(self.expert)

    def create_state(self) -> State:
        """A freshly initialised state, created directly in its sharded layout."""
        mesh = jax.tree.leaves(self.shardings)[0].mesh
        optim = json.dumps(self.expert.optim.to_dict(), sort_keys=True)
        return _jitted_init(self.expert.model, optim, self.seed, mesh)()

    def num_params(self) -> int:
        return sum(int(a.size) for a in jax.tree.leaves(self.abstract["params"]))


def setup_expert(expert: Expert, mesh: Mesh, seed: int) -> ExpertSetup:
    """The :class:`ExpertSetup` of one expert on ``mesh`` (abstract evaluation only)."""
    tx = make_optimizer(expert.optim)
    abstract = jax.eval_shape(lambda: _init_state(expert.model, tx, seed))
    shardings = sharding.param_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return ExpertSetup(expert=expert, tx=tx, graphdef=model_graphdef(expert.model),
                       abstract=abstract, shardings=shardings, seed=seed)


def setup_experts(config: ml_collections.ConfigDict, mesh: Mesh,
                  indices: Sequence[int] | None = None) -> list[ExpertSetup]:
    """Per-expert setups of a run config, in config order.

    Args:
      config: run config (experts, model, optim sections and seed).
      mesh: the device mesh the states live on.
      indices: which experts (default: all).

    Returns:
      One :class:`ExpertSetup` per selected expert; expert k is seeded with ``seed + k``.
    """
    experts = experts_from_config(config)
    chosen = range(len(experts)) if indices is None else indices
    return [setup_expert(experts[k], mesh, config.seed + k) for k in chosen]
