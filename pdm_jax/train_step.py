"""The pure train step of the expert ensemble: hybrid loss, Adam(W), EMA, non-finite guard.

Kept free of TensorFlow, orbax and clu (unlike the training loop in train.py) so benchmarks and
recipe sweeps can run it on machines that have only JAX, Flax and optax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from pdm_jax import train_state
from pdm_jax.diffusion.losses import q_sample, training_losses
from pdm_jax.diffusion.schedules import Schedule, sample_timesteps
from pdm_jax.experts import Expert, training_timestep_range


def make_train_step(config: ml_collections.ConfigDict, experts: list[Expert],
                    graphdefs: list[nnx.GraphDef], txs: list[optax.GradientTransformation],
                    schedule: Schedule):
    """The pure train step ``(state, batch) -> (state, metrics)`` over the trained experts.

    ``state`` maps expert names to per-expert states. A step whose loss or gradient norm is
    non-finite for any expert leaves every state unchanged and reports ``nonfinite=1``, so the
    host stops without a corrupt state ever existing, let alone being checkpointed.
    """
    d, t_cfg = config.diffusion, config.train
    t_ranges = [training_timestep_range(e, schedule) for e in experts]

    def expert_update(expert, graphdef, tx, t_range, state, batch):
        unet = expert.model
        rng = jax.random.fold_in(state["rng"], state["step"])
        t_rng, noise_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = batch["image"]
        t = sample_timesteps(t_rng, x0.shape[0], *t_range)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = q_sample(schedule, x0, t, noise)
        y = None
        if unet.num_classes:
            # Label dropout trains the null label used by classifier-free guidance (SPEC 5, 8).
            drop = jax.random.bernoulli(label_rng, t_cfg.label_dropout, t.shape)
            y = jnp.where(drop, unet.num_classes, batch["label"])

        def loss_fn(params):
            mean_out, var_out = nnx.merge(graphdef, params)(
                x_t, t, y, dropout_rng=dropout_rng if unet.dropout > 0 else None)
            terms = training_losses(schedule, mean_out, var_out, x0, noise, t,
                                    parameterization=d.parameterization, weighting=d.weighting,
                                    learn_sigma=unet.learn_sigma)
            return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = t_cfg.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        grad_norm = optax.tree.norm(grads)
        new_state = {"params": params, "opt_state": opt_state, "ema": ema,
                     "step": state["step"] + 1, "rng": state["rng"]}
        step_metrics = {**terms, "grad_norm": grad_norm,
                        "lr": train_state.learning_rate_schedule(expert.optim)(state["step"])}
        return new_state, step_metrics, jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def train_step(state, batch):
        new_state, step_metrics, finite = {}, {}, jnp.bool_(True)
        for expert, graphdef, tx, t_range in zip(experts, graphdefs, txs, t_ranges):
            new_state[expert.name], m, ok = expert_update(
                expert, graphdef, tx, t_range, state[expert.name], batch)
            prefix = f"{expert.name}/" if len(experts) > 1 else ""
            step_metrics.update({prefix + k: v for k, v in m.items()})
            finite &= ok
        if len(experts) > 1:
            step_metrics["loss"] = sum(step_metrics[f"{e.name}/loss"] for e in experts)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        step_metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return new_state, step_metrics

    return train_step
