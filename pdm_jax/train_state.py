"""The train state: creation already sharded over the mesh, optimiser, EMA, restore.

The state is a plain dict pytree so that optax, orbax and jit shardings all see the same tree:
``{'params', 'opt_state', 'ema', 'step', 'rng'}``; params and EMA are NNX pure dicts merged
into the U-Net graph inside jit (``nnx.merge(graphdef, params)``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from pdm_jax import sharding
from pdm_jax.models.unet import UNet, UNetConfig

State = dict[str, Any]


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to ``optim.lr`` over ``optim.warmup_steps``, then constant (SPEC 7)."""
    if optim.warmup_steps <= 0:
        return optax.constant_schedule(optim.lr)
    return optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam(W) with linear warmup and optional global-norm clipping.

    Args:
      optim: the config's optim section (lr, warmup_steps, b1, b2, eps, weight_decay, grad_clip).

    Returns:
      An optax transformation; the clipping stage is present only when grad_clip > 0, which is
      why grad_clip's on/off enters the checkpoint fingerprint.
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
    return nnx.to_pure_dict(nnx.state(UNet(unet_config, rngs=nnx.Rngs(rng)), nnx.Param))


def _init_state(unet_config: UNetConfig, tx: optax.GradientTransformation, seed: int) -> State:
    rng = jax.random.PRNGKey(seed)
    init_rng, train_rng = jax.random.split(rng)
    params = init_params(unet_config, init_rng)
    return {"params": params, "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params), "step": jnp.zeros((), jnp.int32),
            "rng": train_rng}


def state_shardings(unet_config: UNetConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    seed: int = 0) -> tuple[State, State]:
    """Abstract state and its shardings (FSDP rules over the mesh), without allocating it.

    Returns:
      (abstract_state with shardings attached, tree of NamedSharding).
    """
    abstract = jax.eval_shape(lambda: _init_state(unet_config, tx, seed))
    shardings = sharding.param_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def create_state(unet_config: UNetConfig, tx: optax.GradientTransformation, mesh: Mesh,
                 seed: int) -> State:
    """A freshly initialised state, created directly in its sharded layout (jit out_shardings)."""
    _, shardings = state_shardings(unet_config, tx, mesh, seed)
    return jax.jit(lambda: _init_state(unet_config, tx, seed), out_shardings=shardings)()
