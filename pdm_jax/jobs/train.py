"""Training job: one linear function from config to checkpoints (big_vision style).

Trains one expert of the ensemble (``train.expert=K``) or all of them at once (``-1``, the
default; a single-model config is one expert). Training all experts sums their losses: every
expert sees the same images, each with timesteps drawn inside its own SNR interval, and keeps
its own optimiser, EMA and checkpoint sub-directory ``checkpoints/<expert name>``; a step is
resumed only when every trained expert committed it (checkpointing.ExpertCheckpoints).

A run survives SIGTERM (it saves and exits) and SIGKILL at any moment (the same command resumes
from the newest complete step, bitwise equal to an uninterrupted run, with every step logged up
to it); a second trainer on the same experts is refused (training/lease.py).
"""

from __future__ import annotations

import contextlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from pdm_jax import checkpointing, config_validation, io as io_lib, run_loading, sharding, writers
from pdm_jax.data import pipeline
from pdm_jax.diffusion.experts import experts_from_config, training_timestep_range
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.training import lease as lease_lib
from pdm_jax.training import periodic
from pdm_jax.training.preemption import StopRequest
from pdm_jax.training.state import State, setup_experts
from pdm_jax.training.step import MetricsQueue, NonFiniteLossError, jit_train_step  # noqa: F401


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, State]:
    """Trains (or resumes) the run in ``workdir`` up to ``train.num_steps``.

    Returns:
      The per-expert states after the last step, keyed by expert name.

    Raises:
      NonFiniteLossError: the loss became NaN/Inf (no checkpoint of that state is written).
      lease_lib.WorkdirBusyError: another live run trains these experts in ``workdir``.
    """
    #### Validate, before anything is built or written ####
    started = time.perf_counter()
    config_validation.validate(config, "train", workdir)
    t = config.train
    experts = experts_from_config(config)
    indices = list(range(len(experts))) if t.expert < 0 else [t.expert]
    whole = len(indices) == len(experts)  # grids and FID need every expert
    names = [experts[k].name for k in indices]

    with contextlib.ExitStack() as stack:
        lease = stack.enter_context(lease_lib.hold(workdir, names, take_over=t.take_over))
        if jax.process_index() == 0:
            io_lib.write_atomic(f"{workdir}/{checkpointing.CONFIG_FILE}",
                                config.to_json_best_effort(indent=2, sort_keys=True))

        #### Mesh and per-expert state: restore, warm-start or create, already sharded ####
        mesh = sharding.make_mesh(config.mesh.shape)
        logging.info("Mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size,
                     jax.process_count())
        schedule = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
        setups = setup_experts(config, mesh, indices)
        ckpts = stack.enter_context(contextlib.closing(checkpointing.ExpertCheckpoints(
            workdir, setups, every=config.ckpt.every, keep=config.ckpt.keep,
            async_save=config.ckpt.async_save)))
        restored = ckpts.restore_latest()
        start, states, meta = restored or (0, {}, {})
        for s in setups:
            if s.name not in states:
                states[s.name] = s.create_state()
                if s.expert.warm_start_expert >= 0:
                    states[s.name] = run_loading.warm_start(s, states[s.name], workdir, mesh)
            logging.info("%s: %.2f M parameters, trains t in %s, %s", s.expert.describe(),
                         s.num_params() / 1e6, training_timestep_range(s.expert, schedule),
                         f"resumed from step {start}" if restored else "from scratch")

        #### Input pipeline: each process reads its shard, from where the checkpoint left it ####
        # data.global_order: every process reads the single-process stream, keeps its rows.
        global_order = bool(config.data.global_order)
        index, count = (0, 1) if global_order else (jax.process_index(), jax.process_count())
        local_batch = t.batch_size // count
        position = _resume_position(meta, start * local_batch, global_order)
        batches = pipeline.iterate_numpy(pipeline.make_train_dataset(
            config.data, global_batch_size=t.batch_size, seed=config.seed, process_index=index,
            process_count=count, start_example=position))

        #### Compile ####
        step_fn = jit_train_step(config, setups, schedule, mesh)
        if jax.process_count() > 1:
            # Processes finish compiling at different times, and the CPU backend's first
            # collective (gloo) fails if they reach it over 30 s apart: compile, then meet.
            step_fn = step_fn.lower(states, _batch_spec(config, mesh)).compile()
            checkpointing.wait_for_all_processes("pdm_jax_train_step_compiled")
        grids = periodic.SampleGrid(config, mesh, workdir) if whole and t.sample_every else None
        fid = periodic.PeriodicFid(config, mesh) if whole and t.fid_every else None
        if not whole and (t.sample_every or t.fid_every):
            logging.info("No sample grids or FID: training %d of %d experts.", len(indices),
                         len(experts))

        #### Train loop ####
        writer = writers.create_writer(workdir, config.log.tensorboard, resume_step=start,
                                       name=None if whole else names[0])
        stack.callback(writer.close)
        progress = writers.ReportProgress(num_steps=t.num_steps, items_per_step=t.batch_size,
                                          writer=writer, every_steps=t.log_every,
                                          every_secs=None)
        progress(start)
        stop = stack.enter_context(StopRequest())
        queue, step = MetricsQueue(), start
        built = time.perf_counter()
        while step < t.num_steps:
            batch = next(batches)
            position = pipeline.records_consumed(batch)
            batch = sharding.global_batch({k: batch[k] for k in ("image", "label")}, mesh,
                                          full=global_order)
            states, step_metrics = step_fn(states, batch)
            step += 1
            if step == start + 1:
                _log_first_step(step_metrics, started, built)
            queue.push(step_metrics)
            if step % t.log_every == 0 or step == t.num_steps:
                writer.write_scalars(step, queue.drain(step))
            progress(step)
            emas = [states[name]["ema"] for name in names]
            if grids is not None and periodic.due(step, t.sample_every, t.num_steps):
                grids(step, emas, writer)
            if fid is not None and periodic.due(step, t.fid_every, t.num_steps):
                fid(step, emas, writer)
            if lease is not None and lease.lost.is_set():
                raise lease_lib.WorkdirBusyError("Another run took over this workdir's lease; "
                                                 "stopped without saving.")
            stopping = stop.should_stop(step)
            if ckpts.should_save(step) or stopping or step == t.num_steps:
                queue.check(step)  # never checkpoint a state that followed a non-finite step
                writer.flush()  # every logged step reaches the disk before its checkpoint
                ckpts.save(step, states, {"data_position": _data_position(position)})
            if stopping:
                logging.warning("Stop requested (SIGTERM/preemption) at step %d: saved.", step)
                break
    return states


def _log_first_step(step_metrics, started: float, built: float) -> None:
    """Logs the time to the first step: set-up (data, state, restore) and compile + step."""
    jax.block_until_ready(step_metrics)
    now = time.perf_counter()
    logging.info("First step done %.1f s after train started: %.1f s set-up (state, data, "
                 "restore), %.1f s compiling and running it (a warm compilation cache skips "
                 "most of the compile).", now - started, built - started, now - built)


def _batch_spec(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    size, b = config.data.image_size, config.train.batch_size
    batch = sharding.batch_sharding(mesh)
    return {"image": jax.ShapeDtypeStruct((b, size, size, 3), np.float32, sharding=batch),
            "label": jax.ShapeDtypeStruct((b,), np.int32, sharding=batch)}


def _data_position(position: int) -> dict[str, list[int]]:
    """Every process's stream position (records read, dropped ones included)."""
    gathered = multihost_utils.process_allgather(np.asarray(position, np.int64))
    return {"records_consumed_per_process": [int(p) for p in np.ravel(gathered)]}


def _resume_position(meta: dict, default: int, global_order: bool) -> int:
    """Where this process's stream resumes: its recorded position, else ``default``."""
    positions = meta.get("data_position", {}).get("records_consumed_per_process")
    if positions is None:
        return default
    if global_order:  # every process read the same single-process stream
        return positions[0]
    if len(positions) != jax.process_count():
        logging.warning("The checkpoint was written by %d processes, this run has %d: the data "
                        "stream restarts at step * batch, not bitwise where it stopped.",
                        len(positions), jax.process_count())
        return default
    position = positions[jax.process_index()]
    if position != default:
        logging.warning("%d record(s) of this process's stream failed to decode and were "
                        "skipped so far (resuming at record %d, step %d).", position - default,
                        position, default)
    return position
