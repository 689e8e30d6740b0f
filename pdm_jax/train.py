"""Training job: one linear function from config to checkpoints (big_vision style)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from pdm_jax import checkpointing, config_lib, metrics, sample, sharding, train_state
from pdm_jax.data import pipeline
from pdm_jax.diffusion.losses import q_sample, training_losses
from pdm_jax.diffusion.schedules import Schedule, sample_timesteps, timestep_range_for_snr_interval


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf; the state was not updated nor checkpointed."""


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: Schedule,
                    t_range: tuple[int, int]):
    """The pure train step ``(state, batch) -> (state, metrics)``.

    A step whose loss or gradient norm is non-finite leaves the state unchanged (params,
    optimiser, EMA and step) and reports ``nonfinite=1``, so the host can stop without a corrupt
    state ever existing, let alone being checkpointed.
    """
    unet = config_lib.unet_config(config)
    d, t_cfg = config.diffusion, config.train

    def loss_fn(params, x0, x_t, noise, t, y, dropout_rng):
        mean_out, var_out = nnx.merge(graphdef, params)(x_t, t, y, dropout_rng=dropout_rng)
        terms = training_losses(schedule, mean_out, var_out, x0, noise, t,
                                parameterization=d.parameterization, weighting=d.weighting,
                                learn_sigma=unet.learn_sigma)
        return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

    def train_step(state, batch):
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
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], x0, x_t, noise, t, y, dropout_rng if unet.dropout > 0 else None)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = t_cfg.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {"params": params, "opt_state": opt_state, "ema": ema,
                     "step": state["step"] + 1, "rng": state["rng"]}
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        step_metrics = {**terms, "grad_norm": grad_norm,
                        "lr": train_state.learning_rate_schedule(config.optim)(state["step"]),
                        "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new_state, step_metrics

    return train_step


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run in ``workdir`` up to ``train.num_steps``.

    Returns:
      The state after the last step.

    Raises:
      NonFiniteLossError: the loss became NaN/Inf (no checkpoint of that state is written).
    """
    #### Validate before any compile or data loading ####
    config_lib.validate(config)
    unet = config_lib.unet_config(config)
    t_cfg = config.train
    if t_cfg.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={t_cfg.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes.")
    tf.io.gfile.makedirs(workdir)
    if jax.process_index() == 0:
        with tf.io.gfile.GFile(f"{workdir}/config.json", "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    #### Set up mesh ####
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    if t_cfg.batch_size % mesh.size:
        raise ValueError(f"train.batch_size={t_cfg.batch_size} is not divisible by the "
                         f"{mesh.size} devices of mesh {dict(mesh.shape)}.")
    logging.info("Mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size,
                 jax.process_count())

    #### Diffusion ####
    d = config.diffusion
    schedule = Schedule.from_name(d.schedule, d.num_timesteps)
    t_range = timestep_range_for_snr_interval(schedule, *d.snr_interval)
    logging.info("Training on t in [%d, %d] (SNR interval %s)", *t_range, tuple(d.snr_interval))

    #### Train state: restore or create, already sharded ####
    tx = train_state.make_optimizer(config.optim)
    abstract, shardings = train_state.state_shardings(unet, tx, mesh, config.seed)
    ckpt = checkpointing.Checkpointer(
        f"{workdir}/checkpoints", max_to_keep=config.ckpt.keep,
        save_interval_steps=config.ckpt.every, async_save=config.ckpt.async_save,
        config_fingerprint=config_lib.architecture_fingerprint(config),
        config_json=config.to_json_best_effort(sort_keys=True))
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract)
        logging.info("Resumed from step %d (%s)", int(state["step"]), meta.get("data_position"))
    else:
        state = train_state.create_state(unet, tx, mesh, config.seed)
    start_step = int(state["step"])
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    logging.info("U-Net: %.2f M parameters, patch %d, image %d", num_params / 1e6,
                 unet.patch_size, unet.image_size)

    #### Input pipeline ####
    local_batch = t_cfg.batch_size // jax.process_count()
    dataset = pipeline.make_train_dataset(
        config.data, global_batch_size=t_cfg.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_example=start_step * local_batch)
    batches = pipeline.iterate_numpy(dataset)

    #### Compile ####
    graphdef = train_state.model_graphdef(unet)
    step_fn = jax.jit(make_train_step(config, graphdef, tx, schedule, t_range),
                      in_shardings=(shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    grid_fn = None
    if t_cfg.sample_every > 0:
        grid_size = t_cfg.grid_size + (-t_cfg.grid_size) % mesh.size
        grid_fn = functools.partial(sample.make_sample_fn(
            config, mesh, steps=t_cfg.grid_steps, sampler="ddpm", eta=0.0,
            guidance_scale=config.sample.guidance_scale, batch_size=grid_size),
            labels=jnp.asarray(sample.balanced_labels(0, grid_size, unet.num_classes)))

    #### Train loop ####
    writer = metrics.create_writer(workdir, config.log.tensorboard)
    progress = metrics.Progress(t_cfg.num_steps, t_cfg.batch_size, start_step)
    pending: list[dict] = []
    ckpt.install_sigterm_handler()

    def drain_metrics(step: int) -> dict[str, float]:
        """Fetches the queued per-step metrics; raises on any non-finite step."""
        fetched = jax.device_get(pending)
        pending.clear()
        for offset, m in enumerate(fetched):
            if m["nonfinite"] > 0:
                bad_step = step - len(fetched) + offset
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {bad_step} (loss={m['loss']}, "
                    f"grad_norm={m['grad_norm']}); the state was kept at step {bad_step} and "
                    f"not checkpointed. Lower optim.lr or enable optim.grad_clip.")
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]} if fetched else {}

    def save(step: int, force: bool = False) -> None:
        if force or ckpt.should_save(step):
            drain_metrics(step)  # never checkpoint a state that followed a non-finite step
            ckpt.save(step, state, {"data_position": {
                "examples_consumed_per_process": step * local_batch}}, force=force)

    step = start_step
    try:
        while step < t_cfg.num_steps:
            batch = sharding.global_batch(next(batches), mesh)
            state, step_metrics = step_fn(state, batch)
            step += 1
            pending.append(step_metrics)
            if step % t_cfg.log_every == 0 or step == t_cfg.num_steps:
                scalars = {k: v for k, v in drain_metrics(step).items() if k != "nonfinite"}
                line, rates = progress.line(step, scalars)
                logging.info("%s", line)
                writer.write_scalars(step, {**scalars, **rates})
            if grid_fn is not None and (step % t_cfg.sample_every == 0 or step == t_cfg.num_steps):
                write_grid(grid_fn, state["ema"], step, workdir, writer)
            save(step)
            if ckpt.should_stop(step):
                logging.warning("Stop requested (SIGTERM/preemption) at step %d: saving.", step)
                save(step, force=True)
                break
        if step == t_cfg.num_steps:
            save(step, force=True)
    finally:
        ckpt.close()  # waits for pending async saves
        writer.flush()
    return state


def write_grid(grid_fn, ema, step: int, workdir: str, writer) -> None:
    """Samples a grid with the EMA weights and writes it as PNG and to TensorBoard."""
    start = time.perf_counter()
    images = metrics.to_uint8(multihost_utils.process_allgather(
        grid_fn(ema, jax.random.PRNGKey(step)), tiled=True))
    grid = metrics.image_grid(images)
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(f"{workdir}/samples")
        metrics.save_png(f"{workdir}/samples/grid_step{step:08d}.png", grid)
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Sample grid at step %d took %.1fs", step, time.perf_counter() - start)


__all__ = ["train", "make_train_step", "NonFiniteLossError"]
