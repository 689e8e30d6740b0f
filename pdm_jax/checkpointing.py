"""Checkpoints: the only module that talks to orbax.

Layout: ``WORKDIR/checkpoints/<expert name>/<step>/`` per expert, each step holding two orbax
items: 'state' (the train state pytree; tensorstore/OCDBT, every process writes its own shards)
and 'meta' (JSON: the caller's metadata, e.g. the data position, plus the expert's checkpoint
signature, so a restore under another architecture names the keys that differ).

Guarantees:
  * Atomic steps: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete
    (on GCS, where renames are not atomic, ``commit_success.txt`` marks completion). A step
    directory without its commit files (empty, foreign, cut short) is never read: it is moved
    aside to ``<step>.incomplete-<time>`` with a warning naming it.
  * One step = one consistent set of experts: :class:`ExpertCheckpoints` saves every trained
    expert at the same steps, resumes from the newest step that EVERY one of them committed
    (discarding newer steps that only some committed, e.g. after a kill inside an async save),
    and deletes old steps itself, only once a newer complete set exists.
  * Topology-free restore: the restore target carries shardings for the CURRENT mesh.
  * Clear refusals: another architecture, another tree, or a state holding NaN/Inf.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store as array_metadata_store_lib

from pdm_jax import config_lib
from pdm_jax.sharding import path_str
from pdm_jax.training.state import ExpertSetup, State

_STATE, _META = "state", "meta"
_SIGNATURE_KEY = "checkpoint_signature"
CONFIG_FILE = "config.json"


#### Helpers ####


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """One bool per leaf: all elements finite. One fused reduction, one tiny device->host copy."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _first_non_finite(state: Any) -> str | None:
    """The path of the first floating leaf holding NaN/Inf, or None if all are finite."""
    named = [(path_str(path), leaf)
             for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
             if jnp.issubdtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf),
                               jnp.inexact)]
    if not named:
        return None
    flags = np.asarray(jax.device_get(_finite_flags([leaf for _, leaf in named])))
    bad = np.flatnonzero(~flags)
    return named[bad[0]][0] if bad.size else None


def _stored_shape(leaf: Any) -> tuple[int, ...]:
    """Shape orbax stores for a target leaf: typed PRNG keys are stored as their key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(np.shape(leaf))


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process has called this with the same `name`; no-op for one process.

    A coordination-service barrier, not a device collective: the way to line processes up
    BEFORE their first collective (the CPU backend's gloo gives up when they arrive > 30 s apart).
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def _configure_array_writes() -> None:
    """One process writes whole replicated arrays; only several hosts split them.

    Orbax's replica-parallel saving splits every replicated array among its replicas so that
    several hosts share the writing; within one process it gains nothing and jit-compiles a
    slicing program per array shape and replica (hundreds, about 10 s per expert on a CPU with
    8 devices, before the first save can start).
    """
    # The array metadata store (as in orbax's default handler) records typed PRNG keys;
    # without it they restore as raw uint32 key data.
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=jax.process_count() > 1,
            array_metadata_store=array_metadata_store_lib.Store()),
        override=True)


def is_complete_step(step_dir: epath.Path) -> bool:
    """Whether a step directory holds a finished checkpoint of both items."""
    required = ["_CHECKPOINT_METADATA", f"{_STATE}/_METADATA", f"{_META}/metadata"]
    if "://" in str(step_dir):  # object stores: renames are not atomic, commit markers decide
        required += ["commit_success.txt", f"{_STATE}/commit_success.txt"]
    return all((step_dir / name).exists() for name in required)


def _set_aside_incomplete_steps(directory: epath.Path) -> None:
    """Renames step directories that are not complete checkpoints out of orbax's sight."""
    if jax.process_index() != 0 or not directory.exists():
        return
    for step_dir in directory.iterdir():
        if step_dir.name.isdigit() and not is_complete_step(step_dir):
            aside = step_dir.parent / f"{step_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"
            logging.warning("%s is not a complete checkpoint (no commit files: killed or "
                            "concurrent writer?); moving it aside to %s and resuming from the "
                            "newest complete step.", step_dir, aside.name)
            step_dir.rename(aside)


#### One directory ####


class Checkpointer:
    """Saves and restores (train state, JSON metadata) per step in one directory with orbax.

    Keeps every step: old steps are deleted explicitly (:meth:`delete`), by
    :class:`ExpertCheckpoints` once a newer complete set of experts exists.
    """

    def __init__(self, directory: str, *, save_interval_steps: int = 1, async_save: bool = True,
                 signature: Mapping[str, Any] | None = None, writer: bool = False) -> None:
        """Opens (and creates) a checkpoint directory.

        Args:
          directory: local path or gs:// URL.
          save_interval_steps: save() without force writes only steps divisible by this.
          async_save: save() returns once arrays are in host memory; the write continues in a
            background thread.
          signature: what the stored arrays depend on (``training.state.checkpoint_signature``);
            a restore of a checkpoint with another signature is refused, naming the keys.
          writer: this process owns the directory (the training run holding the workdir's
            lease): incomplete step directories are moved aside. Readers only skip them (on GCS
            a step being written has no commit marker yet).
        """
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
        path = epath.Path(directory)
        if "://" not in directory:
            path = path.absolute()
        self.directory = str(path)
        self.signature = dict(signature) if signature is not None else None
        self._interval = save_interval_steps
        self._path = path
        _configure_array_writes()
        if writer:
            _set_aside_incomplete_steps(path)
        wait_for_all_processes(f"pdm_jax_checkpoint_dir_checked:{self.directory}")
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            # Unfinished '<step>.orbax-checkpoint-tmp-*' dirs from a killed run waste disk.
            cleanup_tmp_directories=True, create=True)
        # Explicit handlers so a fresh process can read item metadata before any save.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META),
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _META: ocp.JsonCheckpointHandler()})

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first (incomplete step directories are skipped)."""
        return sorted(s for s in self._manager.all_steps()
                      if is_complete_step(self._path / str(s)))

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self._interval == 0

    def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        """Starts writing ``state`` and ``metadata`` as step ``step`` (every process calls it).

        Raises:
          ValueError: the step exists, the metadata is not JSON, or a floating leaf holds NaN/Inf.
        """
        if step in self._manager.all_steps():
            raise ValueError(f"Checkpoint step {step} already exists in {self.directory}.")
        meta = dict(metadata, **{_SIGNATURE_KEY: self.signature})
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"Checkpoint metadata is not JSON-serialisable: {e}") from e
        bad = _first_non_finite(state)
        if bad is not None:
            raise ValueError(f"Refusing to save step {step} to {self.directory}: state leaf "
                             f"{bad} contains NaN or Inf.")
        logging.info("Saving checkpoint step %d to %s.", step, self.directory)
        self._manager.save(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}), force=True)

    def delete(self, step: int) -> None:
        """Deletes a committed step (every process calls it)."""
        self._manager.delete(step)

    def wait_until_finished(self) -> None:
        """Blocks until an asynchronous save has been written and committed."""
        self._manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Reads step ``step`` (default: latest) into arrays laid out as ``abstract_state`` asks.

        Args:
          abstract_state: pytree of jax.ShapeDtypeStruct with shardings for the current mesh.
          step: the step to read.

        Returns:
          (state, metadata).

        Raises:
          FileNotFoundError: no such step.
          ValueError: another checkpoint signature, or stored keys/shapes that differ from the
            target, before any array is read.
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"No checkpoint step {step} in {self.directory}; committed "
                                    f"steps: {self.all_steps()}.")
        meta = dict(self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META])
        self._check_signature(meta.get(_SIGNATURE_KEY), step)
        self._check_structure(abstract_state, step)
        logging.info("Restoring checkpoint step %d from %s.", step, self.directory)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state)}))
        return restored[_STATE], meta

    def _check_signature(self, stored: Any, step: int) -> None:
        if self.signature is None or stored is None or stored == self.signature:
            return
        differences = config_lib.dotted_differences(stored, self.signature)
        raise ValueError(
            f"Checkpoint {self.directory} step {step} was written for another architecture "
            f"(checkpoint vs current config): {'; '.join(differences)}. Resume with the "
            f"original settings or use a new workdir.")

    def _check_structure(self, abstract_state: Any, step: int) -> None:
        """Compares stored keys/shapes with the target before reading any array."""
        tree = self._manager.item_metadata(step)[_STATE].tree
        stored = {path_str(p): tuple(getattr(m, "shape", np.shape(m)))
                  for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
        where = f"checkpoint {self.directory} step {step}"
        target = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        for path, leaf in target:
            key, shape = path_str(path), _stored_shape(leaf)
            if key not in stored:
                raise ValueError(f"Restore target key {key} (shape {shape}) is not in {where}; "
                                 f"stored keys include {sorted(stored)[:8]}.")
            if stored[key] != shape:
                raise ValueError(f"Shape mismatch at {key}: {where} has shape {stored[key]}, "
                                 f"the restore target has shape {shape}.")
        extra = sorted(stored.keys() - {path_str(p) for p, _ in target})
        if extra:
            raise ValueError(f"{where} has key {extra[0]} (shape {stored[extra[0]]}) that the "
                             f"restore target lacks ({len(extra)} such keys).")

    def close(self) -> None:
        """Waits for a pending save and closes the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


#### The trained experts of a run ####


def expert_checkpoint_dir(workdir: str, expert_name: str) -> str:
    return f"{workdir}/checkpoints/{expert_name}"


class ExpertCheckpoints:
    """The checkpoints of the experts one run trains, saved and resumed as one set.

    Example:
      ckpts = ExpertCheckpoints(workdir, setups, every=1000, keep=3)
      restored = ckpts.restore_latest()          # (step, states, meta) or None
      ...
      if ckpts.should_save(step): ckpts.save(step, states, {"data_position": ...})
      ckpts.close()
    """

    def __init__(self, workdir: str, setups: Sequence[ExpertSetup], *, every: int, keep: int,
                 async_save: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"ckpt.keep must be >= 1, got {keep}.")
        self.setups, self.keep = list(setups), keep
        self._ckpts = {s.name: Checkpointer(expert_checkpoint_dir(workdir, s.name),
                                            save_interval_steps=every, async_save=async_save,
                                            signature=s.signature, writer=True)
                       for s in setups}

    def complete_steps(self) -> list[int]:
        """Steps every trained expert has committed, oldest first."""
        steps = [set(c.all_steps()) for c in self._ckpts.values()]
        return sorted(set.intersection(*steps))

    def restore_latest(self) -> tuple[int, dict[str, State], dict[str, Any]] | None:
        """Restores the newest step that every trained expert committed.

        Steps newer than it that only some experts committed (a save cut short by a kill) are
        deleted: the resumed run writes them again, bitwise equal.

        Returns:
          (step, {expert name: state}, metadata of the first expert), or None for a fresh run.
        """
        complete = self.complete_steps()
        step = complete[-1] if complete else None
        for name, ckpt in self._ckpts.items():
            for orphan in [s for s in ckpt.all_steps() if step is None or s > step]:
                logging.warning("Discarding step %d of %s: not every trained expert committed "
                                "it (a save cut short); resuming from step %s.", orphan, name,
                                step)
                ckpt.delete(orphan)
        if step is None:
            return None
        states, meta = {}, {}
        for setup in self.setups:
            states[setup.name], meta = self._ckpts[setup.name].restore(setup.abstract, step)
        return step, states, meta

    def should_save(self, step: int) -> bool:
        return next(iter(self._ckpts.values())).should_save(step)

    def save(self, step: int, states: Mapping[str, State], metadata: Mapping[str, Any]) -> None:
        """Starts saving every trained expert at ``step``, after pruning steps that a complete
        newer set makes redundant (never the newest ``keep`` complete steps)."""
        self._prune()  # waits for the save in flight first
        if step in self.complete_steps():
            logging.info("Checkpoint step %d exists already; not saving it again.", step)
            return
        for name, ckpt in self._ckpts.items():
            ckpt.save(step, states[name], metadata)

    def _prune(self) -> None:
        for ckpt in self._ckpts.values():
            ckpt.wait_until_finished()  # count only committed steps as complete
        complete = self.complete_steps()
        if len(complete) <= self.keep:
            return
        oldest_kept = complete[-self.keep]
        for ckpt in self._ckpts.values():
            for step in ckpt.all_steps():
                if step < oldest_kept:
                    ckpt.delete(step)

    def close(self) -> None:
        """Waits for pending saves (then prunes) and closes every directory."""
        for ckpt in self._ckpts.values():
            ckpt.wait_until_finished()
        self._prune()
        for ckpt in self._ckpts.values():
            ckpt.close()
