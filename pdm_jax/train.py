"""Training job: one linear function from config to checkpoints (big_vision style).

Trains one expert of the ensemble (``train.expert=K``) or all of them at once (``-1``, the
default; a single-model config is one expert). Training all experts sums their losses: every
expert sees the same images, each with timesteps drawn inside its own SNR interval, and keeps
its own optimiser, EMA and checkpoint sub-directory ``checkpoints/<expert.name>``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

from pdm_jax import (checkpointing, config_lib, eval_run, metrics, sample, sharding,
                     train_state)
from pdm_jax.data import pipeline
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.experts import Expert, experts_from_config, training_timestep_range
from pdm_jax.train_step import make_train_step


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/Inf; the state was not updated nor checkpointed."""


def _select_experts(config: ml_collections.ConfigDict) -> tuple[list[Expert], list[Expert]]:
    experts = experts_from_config(config)
    which = config.train.expert
    if which >= len(experts) or which < -1:
        raise ValueError(f"train.expert={which} is out of range: this config has "
                         f"{len(experts)} expert(s) (-1 trains all).")
    return experts, (experts if which < 0 else [experts[which]])


def _warm_start(expert: Expert, state: dict, abstract: dict, mesh, workdir: str) -> dict:
    """Initialises params and EMA from another expert's EMA weights (fresh optimiser state).

    The source is expert ``warm_start_expert`` of ``warm_start_workdir`` (this run's workdir
    when empty), exactly as it was last checkpointed.
    """
    source_workdir = expert.warm_start_workdir or workdir
    source = sample.load_expert_ema(source_workdir, expert.warm_start_expert, mesh)
    shapes = jax.tree.map(lambda a: a.shape, source)
    if shapes != jax.tree.map(lambda a: a.shape, abstract["params"]):
        raise ValueError(f"Warm start of {expert.describe()} from expert "
                         f"{expert.warm_start_expert} of {source_workdir}: the architectures "
                         f"differ.")
    params = jax.tree.map(lambda s, a: jax.device_put(s, a.sharding), source, abstract["params"])
    logging.info("Warm-started %s from expert %d of %s", expert.describe(),
                 expert.warm_start_expert, source_workdir)
    return {**state, "params": params, "ema": jax.tree.map(jnp.copy, params)}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run in ``workdir`` up to ``train.num_steps``.

    Returns:
      The per-expert states after the last step, keyed by expert name.

    Raises:
      NonFiniteLossError: the loss became NaN/Inf (no checkpoint of that state is written).
    """
    #### Validate before any compile or data loading ####
    config_lib.validate(config)
    experts, trained = _select_experts(config)
    t_cfg = config.train
    if t_cfg.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={t_cfg.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes.")
    num_classes = experts[0].model.num_classes
    if config.data.class_conditional:
        # Labels index the class embedding [0, num_classes); label num_classes is the null label
        # of guidance and larger ones embed as NaN, which would surface as a "non-finite loss".
        data_classes = pipeline.num_classes(config.data)
        if data_classes > num_classes:
            raise ValueError(f"data {config.data.name!r} has {data_classes} classes but "
                             f"model.num_classes={num_classes}; set model.num_classes >= "
                             f"{data_classes}.")
    if t_cfg.fid_every > 0:
        eval_run.check_periodic_fid(config)
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
    schedule = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)

    #### Train state per expert: restore, warm-start or create, already sharded ####
    txs, graphdefs, ckpts, state, shardings = [], [], {}, {}, {}
    for expert in trained:
        tx = train_state.make_optimizer(expert.optim)
        abstract, shardings[expert.name] = train_state.state_shardings(
            expert.model, tx, mesh, config.seed + expert.index)
        ckpt = checkpointing.Checkpointer(
            f"{workdir}/checkpoints/{expert.name}", max_to_keep=config.ckpt.keep,
            save_interval_steps=config.ckpt.every, async_save=config.ckpt.async_save,
            config_fingerprint=config_lib.architecture_fingerprint(expert.model, expert.optim),
            config_json=config.to_json_best_effort(sort_keys=True))
        if ckpt.latest_step() is not None:
            state[expert.name], meta = ckpt.restore(abstract)
            logging.info("%s: resumed from step %d (%s)", expert.describe(),
                         int(state[expert.name]["step"]), meta.get("data_position"))
        else:
            state[expert.name] = train_state.create_state(expert.model, tx, mesh,
                                                          config.seed + expert.index)
            if expert.warm_start_expert >= 0:
                state[expert.name] = _warm_start(expert, state[expert.name], abstract, mesh,
                                                 workdir)
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
        t_first, t_last = training_timestep_range(expert, schedule)
        logging.info("%s: %.2f M parameters, trains t in [%d, %d]", expert.describe(),
                     params / 1e6, t_first, t_last)
        txs.append(tx)
        graphdefs.append(train_state.model_graphdef(expert.model))
        ckpts[expert.name] = ckpt
    steps = {name: int(s["step"]) for name, s in state.items()}
    if len(set(steps.values())) > 1:
        raise ValueError(f"The trained experts are at different steps {steps}; train them "
                         f"separately with --config.train.expert=K.")
    start_step = next(iter(steps.values()))

    #### Input pipeline ####
    # Default: each process reads its own shard. data.global_order: each reads the stream of a
    # single-process run and keeps its rows (same global batches for any process count).
    global_order = bool(config.data.get("global_order", False))
    local_batch = t_cfg.batch_size // (1 if global_order else jax.process_count())
    process_index, process_count = ((0, 1) if global_order
                                    else (jax.process_index(), jax.process_count()))
    dataset = pipeline.make_train_dataset(
        config.data, global_batch_size=t_cfg.batch_size, seed=config.seed,
        process_index=process_index, process_count=process_count,
        start_example=start_step * local_batch)
    batches = pipeline.iterate_numpy(dataset)

    #### Compile ####
    step_fn = jax.jit(make_train_step(config, trained, graphdefs, txs, schedule),
                      in_shardings=(shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    if jax.process_count() > 1:
        # Processes finish compiling at different times, and the CPU backend's first collective
        # (gloo) fails if they reach it over 30 s apart: compile ahead, then meet at a barrier.
        batch_spec = {k: jax.ShapeDtypeStruct((t_cfg.batch_size, *v.shape[1:]),
                                              v.dtype.as_numpy_dtype,
                                              sharding=sharding.batch_sharding(mesh))
                      for k, v in dataset.element_spec.items()}
        step_fn = step_fn.lower(state, batch_spec).compile()
        checkpointing.wait_for_all_processes("pdm_jax_train_step_compiled")
    grid_fn = None
    if t_cfg.sample_every > 0 and len(trained) == len(experts):
        grid_size = t_cfg.grid_size + (-t_cfg.grid_size) % mesh.size
        grid_fn = functools.partial(sample.make_sample_fn(
            config, mesh, steps=t_cfg.grid_steps, sampler="ddpm", eta=0.0,
            guidance_scale=config.sample.guidance_scale, batch_size=grid_size),
            labels=jnp.asarray(sample.balanced_labels(0, grid_size, num_classes)))
    elif t_cfg.sample_every > 0:
        logging.info("No sample grids: training %d of %d experts.", len(trained), len(experts))
    fid_fn = None
    if t_cfg.fid_every > 0 and len(trained) == len(experts):
        fid_fn = eval_run.make_scorer(config, mesh, num_samples=t_cfg.fid_num_samples,
                                      steps=t_cfg.fid_steps)
    elif t_cfg.fid_every > 0:
        logging.info("No FID during training: training %d of %d experts.", len(trained),
                     len(experts))

    #### Train loop ####
    writer = metrics.create_writer(workdir, config.log.tensorboard)
    progress = metrics.Progress(t_cfg.num_steps, t_cfg.batch_size, start_step)
    pending: list[dict] = []
    # One handler for the run: SIGTERM (and multi-host preemption) stops every expert together.
    first_ckpt = next(iter(ckpts.values()))
    first_ckpt.install_sigterm_handler()

    def drain_metrics(step: int) -> dict[str, float]:
        """Fetches the queued per-step metrics; raises on any non-finite step."""
        fetched = jax.device_get(pending)
        pending.clear()
        for offset, m in enumerate(fetched):
            if m["nonfinite"] > 0:
                bad_step = step - len(fetched) + offset
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {bad_step} (loss={m['loss']}); the "
                    f"state was kept at step {bad_step} and not checkpointed. Lower optim.lr "
                    f"or enable optim.grad_clip.")
        return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]} if fetched else {}

    def save(step: int, force: bool = False) -> None:
        if force or first_ckpt.should_save(step):
            drain_metrics(step)  # never checkpoint a state that followed a non-finite step
            for name, ckpt in ckpts.items():
                ckpt.save(step, state[name], {"data_position": {
                    "examples_consumed_per_process": step * local_batch}}, force=force)

    step = start_step
    try:
        while step < t_cfg.num_steps:
            batch = sharding.global_batch(next(batches), mesh, full=global_order)
            state, step_metrics = step_fn(state, batch)
            step += 1
            pending.append(step_metrics)
            if step % t_cfg.log_every == 0 or step == t_cfg.num_steps:
                scalars = {k: v for k, v in drain_metrics(step).items() if k != "nonfinite"}
                # The line keeps totals and per-expert losses; the writer gets every scalar.
                shown = {k: v for k, v in scalars.items() if "/" not in k or k.endswith("/loss")}
                line, rates = progress.line(step, shown)
                logging.info("%s", line)
                writer.write_scalars(step, {**scalars, **rates})
            if grid_fn is not None and (step % t_cfg.sample_every == 0 or step == t_cfg.num_steps):
                write_grid(grid_fn, [state[e.name]["ema"] for e in experts], step, workdir,
                           writer)
            if fid_fn is not None and (step % t_cfg.fid_every == 0 or step == t_cfg.num_steps):
                write_fid(fid_fn, [state[e.name]["ema"] for e in experts], step, writer)
            save(step)
            if first_ckpt.should_stop(step):
                logging.warning("Stop requested (SIGTERM/preemption) at step %d: saving.", step)
                save(step, force=True)
                break
        if step == t_cfg.num_steps:
            save(step, force=True)
    finally:
        for ckpt in ckpts.values():
            ckpt.close()  # waits for pending async saves
        writer.flush()
    return state


def write_grid(grid_fn, emas: list, step: int, workdir: str, writer) -> None:
    """Samples a grid with the EMA weights and writes it as PNG and to TensorBoard."""
    start = time.perf_counter()
    images = metrics.to_uint8(multihost_utils.process_allgather(
        grid_fn(emas, jax.random.PRNGKey(step)), tiled=True))
    grid = metrics.image_grid(images)
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(f"{workdir}/samples")
        metrics.save_png(f"{workdir}/samples/grid_step{step:08d}.png", grid)
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Sample grid at step %d took %.1fs", step, time.perf_counter() - start)


def write_fid(fid_fn, emas: list, step: int, writer) -> dict[str, float]:
    """Scores the EMA experts (eval_run.make_scorer) and writes the metrics as eval/* scalars."""
    result = fid_fn(emas)
    scalars = {f"eval/{k}": float(result[k]) for k in
               ("fid", "sfid", "inception_score", "precision", "recall") if result[k] is not None}
    writer.write_scalars(step, scalars)
    logging.info("Step %d, %d samples (%s%s, w=%g): %s (%.0fs)", step, result["num_samples"],
                 result["sampler"], result["steps"], result["guidance_scale"],
                 ", ".join(f"{k[5:]} {v:.4g}" for k, v in scalars.items()),
                 result["sample_and_feature_seconds"])
    return scalars
