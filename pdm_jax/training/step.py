"""The pure train step of the expert ensemble: hybrid loss, Adam(W), EMA, non-finite guard.

Kept free of TensorFlow, orbax and clu (unlike the training job) so benchmarks and recipe sweeps
can run it on machines that have only JAX, Flax and optax.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from pdm_jax import sharding
from pdm_jax.diffusion.experts import training_timestep_range
from pdm_jax.diffusion.losses import q_sample, training_losses
from pdm_jax.diffusion.schedules import Schedule, sample_timesteps
from pdm_jax.training.state import ExpertSetup, State, learning_rate_schedule

TrainStep = Callable[[dict[str, State], dict[str, jax.Array]],
                     tuple[dict[str, State], dict[str, jax.Array]]]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf; the state was not updated nor checkpointed."""


def make_train_step(config: ml_collections.ConfigDict, setups: Sequence[ExpertSetup],
                    schedule: Schedule) -> TrainStep:
    """The pure train step ``(states, batch) -> (states, metrics)`` over the trained experts.

    ``states`` maps expert names to per-expert states. A step whose loss or gradient norm is
    non-finite for any expert leaves every state unchanged and reports ``nonfinite=1``, so the
    host stops without a corrupt state ever existing, let alone being checkpointed.

    Args:
      config: run config (diffusion and train sections are read).
      setups: the trained experts.
      schedule: the full diffusion chain.

    Returns:
      The step function (not jitted: see :func:`jit_train_step`).
    """
    d, t_cfg = config.diffusion, config.train

    def expert_update(setup: ExpertSetup, state: State, batch: dict[str, jax.Array]):
        unet = setup.expert.model
        rng = jax.random.fold_in(state["rng"], state["step"])
        t_rng, noise_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = batch["image"]
        t = sample_timesteps(t_rng, x0.shape[0], *training_timestep_range(setup.expert,
                                                                           schedule))
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = q_sample(schedule, x0, t, noise)
        y = None
        if unet.num_classes:
            # Label dropout trains the null label used by classifier-free guidance (SPEC 5, 8).
            drop = jax.random.bernoulli(label_rng, t_cfg.label_dropout, t.shape)
            y = jnp.where(drop, unet.num_classes, batch["label"])

        def loss_fn(params):
            mean_out, var_out = nnx.merge(setup.graphdef, params)(
                x_t, t, y, dropout_rng=dropout_rng if unet.dropout > 0 else None)
            terms = training_losses(schedule, mean_out, var_out, x0, noise, t,
                                    parameterization=d.parameterization, weighting=d.weighting,
                                    learn_sigma=unet.learn_sigma)
            return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = t_cfg.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        grad_norm = optax.tree.norm(grads)
        new_state = {"params": params, "opt_state": opt_state, "ema": ema,
                     "step": state["step"] + 1, "rng": state["rng"]}
        step_metrics = {**terms, "grad_norm": grad_norm,
                        "lr": learning_rate_schedule(setup.expert.optim)(state["step"])}
        return new_state, step_metrics, jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def train_step(states, batch):
        new_states, step_metrics, finite = {}, {}, jnp.bool_(True)
        for setup in setups:
            new_states[setup.name], m, ok = expert_update(setup, states[setup.name], batch)
            prefix = f"{setup.name}/" if len(setups) > 1 else ""
            step_metrics.update({prefix + k: v for k, v in m.items()})
            finite &= ok
        if len(setups) > 1:
            step_metrics["loss"] = sum(step_metrics[f"{s.name}/loss"] for s in setups)
        new_states = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_states,
                                  states)
        step_metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return new_states, step_metrics

    return train_step


def jit_train_step(config: ml_collections.ConfigDict, setups: Sequence[ExpertSetup],
                   schedule: Schedule, mesh: Mesh) -> Any:
    """:func:`make_train_step` jitted over ``mesh``: states keep their shardings (donated),
    batches are split over every device, metrics are replicated.

    Runs of the same step in one process (tests, sweeps, a resumed run after a stop) share one
    jitted function, so it is traced, lowered and compiled (or loaded) once: the step depends
    only on the settings in the key below, not on step counts, data or logging.
    """
    key = json.dumps({"diffusion": config.diffusion.to_dict(),
                      "train": {k: config.train[k] for k in ("ema_decay", "label_dropout")},
                      "schedule": hashlib.sha1(schedule.betas.tobytes()).hexdigest(),
                      "experts": [[s.name, s.signature, s.expert.optim.to_dict(),
                                   list(s.expert.snr_interval)] for s in setups]},
                     sort_keys=True, default=str)
    if (key, mesh) not in _JITTED_STEPS:
        shardings = {s.name: s.shardings for s in setups}
        _JITTED_STEPS[key, mesh] = jax.jit(
            make_train_step(config, setups, schedule),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    return _JITTED_STEPS[key, mesh]


_JITTED_STEPS: dict[tuple[str, Mesh], Any] = {}


class MetricsQueue:
    """Per-step metrics kept on device until they are needed, then checked and averaged.

    Fetching metrics every step would make the host wait for the device; the queue fetches
    them in one transfer at log and checkpoint steps. Draining raises
    :class:`NonFiniteLossError` for the first non-finite step, so no state after one is ever
    logged as healthy or checkpointed.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, jax.Array]] = []

    def push(self, step_metrics: dict[str, jax.Array]) -> None:
        self._pending.append(step_metrics)

    def check(self, step: int) -> None:
        """Fetches the queued metrics (kept for :meth:`drain`) and raises if a step was bad.

        Raises:
          NonFiniteLossError: naming the first step whose loss or gradient was not finite.
        """
        self._pending = jax.device_get(self._pending)
        for offset, m in enumerate(self._pending):
            if m["nonfinite"] > 0:
                bad = step - len(self._pending) + offset + 1
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {bad} (loss={m['loss']}); the state "
                    f"was kept at step {bad - 1} and not checkpointed. Lower optim.lr or enable "
                    f"optim.grad_clip.")

    def drain(self, step: int) -> dict[str, float]:
        """Checks the queued metrics of the steps up to ``step`` and returns their means."""
        self.check(step)
        fetched, self._pending = self._pending, []
        if not fetched:
            return {}
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]
                if k != "nonfinite"}
