"""Checkpoints: the only module that talks to orbax.

One checkpoint step holds two items (orbax composite args):
  * 'state': the train state, any pytree of (sharded) jax.Arrays, e.g.
    {'params', 'opt_state' (optax namedtuples welcome), 'ema', 'step', 'rng'}.
    Written with StandardSave (tensorstore/OCDBT): every process writes its own shards.
  * 'meta': a JSON dict: the caller's metadata (e.g. {'data_position': {...}}) plus
    'config_fingerprint' and 'config_json' of the run that wrote it.

Guarantees:
  * Atomic: orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames it to '<step>' only
    after every file is written (on GCS a commit_success.txt marks completion instead).
    A process killed mid-save leaves the previous finalised step as latest_step(); the
    unfinished directory is ignored and removed when the next Checkpointer opens the directory.
  * Topology-free restore: restore() takes an abstract target whose ShapeDtypeStructs carry
    shardings for the CURRENT mesh, so a run can resume on a different device count or
    data/fsdp split.
  * Clear refusals: restoring under a different config fingerprint, or into a tree whose
    structure/shapes differ from the stored one, raises ValueError before any array is read;
    saving a state with NaN/Inf raises ValueError instead of overwriting good checkpoints.
  * Preemption: a SIGTERM handler (single process) or JAX's preemption sync point (multi-host)
    makes should_stop(step) true, so the loop saves (force=True) and exits; close() waits for
    the async write.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from pdm_jax.sharding import keypath_str

_STATE, _META = "state", "meta"
_RESERVED_META_KEYS = ("config_fingerprint", "config_json")


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """One bool per leaf: all elements finite. One fused reduction, one tiny device->host copy."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _first_non_finite(state: Any) -> str | None:
    """Returns the path of the first floating leaf holding NaN/Inf, or None if all are finite.

    Cost: one read of the floating leaves on device (memory-bound, far cheaper than the write
    that follows) and a transfer of one bool per leaf.
    """
    named = [
        (keypath_str(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if jnp.issubdtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf),
                          jnp.inexact)
    ]
    if not named:
        return None
    flags = np.asarray(jax.device_get(_finite_flags([leaf for _, leaf in named])))
    bad = np.flatnonzero(~flags)
    return named[bad[0]][0] if bad.size else None


def _expected_stored_shape(leaf: Any) -> tuple[int, ...]:
    """Shape orbax stores for a target leaf: typed PRNG keys are stored as their key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(np.shape(leaf))


def _differing_top_level_keys(stored_json: str, current_json: str) -> list[str]:
    stored, current = json.loads(stored_json), json.loads(current_json)
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return []
    return sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process has called this with the same `name`; no-op for one process.

    A coordination-service barrier (orbax's), not a device collective: it is the way to line
    processes up BEFORE their first collective, which on the CPU backend (gloo) gives up when
    the processes reach it more than 30 s apart.

    Args:
      name: barrier name, the same on every process.
      timeout_s: how long to wait for the slowest process.

    Returns:
      None, once all processes arrived.
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


class Checkpointer:
    """Saves and restores (train state, JSON metadata) per step with orbax.

    Example:
      ckpt = Checkpointer(workdir + '/checkpoints', config_fingerprint=fp, config_json=cj)
      ckpt.install_sigterm_handler()
      if ckpt.latest_step() is not None:
          state, meta = ckpt.restore(abstract_state)
      for step in ...:
          ...
          stop = ckpt.should_stop(step)
          ckpt.save(step, state, {'data_position': ...}, force=stop)
          if stop:
              break
      ckpt.close()
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        config_fingerprint: str | None = None,
        config_json: str | None = None,
    ) -> None:
        """Opens (and creates) a checkpoint directory.

        Args:
          directory: local path or gs:// URL.
          max_to_keep: number of most recent steps kept; older ones are deleted.
          save_interval_steps: save() without force only writes steps divisible by this.
          async_save: if True, save() returns once arrays are copied to host memory and the
            write continues in a background thread.
          config_fingerprint: identifies the config of this run; a restore from a checkpoint
            with another fingerprint is refused.
          config_json: the config as JSON; stored so a refusal can name the differing keys.
        """
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        self.config_fingerprint = config_fingerprint
        self.config_json = config_json
        self._stop = threading.Event()
        self._previous_sigterm_handler: Any = None
        self._sigterm_installed = False
        if save_interval_steps < 1 or max_to_keep < 1:
            raise ValueError(f"save_interval_steps ({save_interval_steps}) and max_to_keep "
                             f"({max_to_keep}) must be >= 1.")
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # Exactly: every save_interval_steps-th step, or a preemption sync point. Orbax's
            # default would also save the first step of every (re)started run.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_interval_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            enable_async_checkpointing=async_save,
            # Unfinished '<step>.orbax-checkpoint-tmp-*' dirs from a killed run waste disk.
            cleanup_tmp_directories=True,
            create=True,
        )
        # Explicit handlers so a fresh process can read item metadata before any save.
        self._manager = ocp.CheckpointManager(
            directory,
            options=options,
            item_names=(_STATE, _META),
            item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                           _META: ocp.JsonCheckpointHandler()},
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    #### Steps ####

    def latest_step(self) -> int | None:
        """Returns the newest finalised step, or None if the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns every finalised step, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True if save(step, ...) without force would write (interval or preemption)."""
        return self._manager.should_save(step)

    #### Save ####

    def save(self, step: int, state: Any, metadata: Mapping[str, Any], force: bool = False) -> bool:
        """Writes `state` and `metadata` as checkpoint `step` (asynchronously if enabled).

        Must be called by every process with the same arguments.

        Args:
          step: training step; also the directory name.
          state: pytree of jax.Arrays (sharded or not) and numpy arrays.
          metadata: JSON-serialisable dict, e.g. {'data_position': {'examples_consumed': n}}.
          force: write even if `step` is not on the save interval (e.g. on preemption).

        Returns:
          True if a save was started; False if skipped (off-interval, or step already saved).

        Raises:
          ValueError: if metadata is not JSON-serialisable, uses a reserved key with another
            value, or a floating leaf of `state` holds NaN/Inf.
        """
        if step in self._manager.all_steps():
            logging.info("Checkpoint step %d already exists in %s; not saving.", step,
                         self.directory)
            return False
        if not force and not self._manager.should_save(step):
            return False
        meta = self._full_metadata(metadata)
        bad = _first_non_finite(state)
        if bad is not None:
            raise ValueError(f"Refusing to save step {step} to {self.directory}: state leaf "
                             f"{bad!r} contains NaN or Inf.")
        logging.info("Saving checkpoint step %d to %s.", step, self.directory)
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                       _META: ocp.args.JsonSave(meta)}),
            force=True,
        )

    def _full_metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        meta = dict(metadata)
        for key, ours in zip(_RESERVED_META_KEYS, (self.config_fingerprint, self.config_json)):
            if key in meta and meta[key] != ours:
                raise ValueError(f"metadata[{key!r}] = {meta[key]!r} conflicts with the "
                                 f"Checkpointer's {key} {ours!r}; set it on the Checkpointer.")
            meta[key] = ours
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"Checkpoint metadata is not JSON-serialisable: {e}") from e
        return meta

    def wait_until_finished(self) -> None:
        """Blocks until any asynchronous save has been written and finalised."""
        self._manager.wait_until_finished()

    #### Restore ####

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Reads a checkpoint into arrays laid out as `abstract_state` asks.

        Args:
          abstract_state: pytree of jax.ShapeDtypeStruct with shardings for the CURRENT mesh
            (e.g. from jax.eval_shape + sharding.param_shardings); any mesh or device count.
          step: the step to read; None means latest_step().

        Returns:
          (state, metadata): the restored pytree (structure of `abstract_state`) and the JSON
          metadata dict, including 'config_fingerprint' and 'config_json'.

        Raises:
          FileNotFoundError: if there is no such step.
          ValueError: if the stored config fingerprint differs from this Checkpointer's, or
            the stored tree's keys/shapes differ from `abstract_state`.
        """
        self._manager.wait_until_finished()  # a step being written cannot be read yet
        if step is None:
            step = self.latest_step()
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"No checkpoint step {step} in {self.directory}; available "
                                    f"steps: {self.all_steps()}.")
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        self._check_config(meta, step)
        self._check_structure(abstract_state, step)
        logging.info("Restoring checkpoint step %d from %s.", step, self.directory)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract_state)}))
        return restored[_STATE], dict(meta)

    def _check_config(self, meta: Mapping[str, Any], step: int) -> None:
        stored = meta.get("config_fingerprint")
        if self.config_fingerprint is None or stored is None:
            return
        if stored == self.config_fingerprint:
            return
        message = (f"Checkpoint {self.directory} step {step} was written with config "
                   f"fingerprint {stored!r}, but the current config has fingerprint "
                   f"{self.config_fingerprint!r}.")
        if meta.get("config_json") and self.config_json:
            keys = _differing_top_level_keys(meta["config_json"], self.config_json)
            message += f" Top-level config keys that differ: {keys}."
        raise ValueError(message + " Resume with the original config or use a new workdir.")

    def _check_structure(self, abstract_state: Any, step: int) -> None:
        """Compares stored keys/shapes with the target before reading any array."""
        try:
            tree = self._manager.item_metadata(step)[_STATE].tree
        except (KeyError, AttributeError, TypeError) as e:  # no metadata: let orbax check
            logging.warning("No tree metadata for step %d (%s); skipping shape check.", step, e)
            return
        stored = {keypath_str(p): tuple(m.shape) if hasattr(m, "shape") else np.shape(m)
                  for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
        where = f"checkpoint {self.directory} step {step}"
        target = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        for path, leaf in target:
            key, shape = keypath_str(path), _expected_stored_shape(leaf)
            if key not in stored:
                raise ValueError(f"Restore target key {key!r} (shape {shape}) is not in {where}; "
                                 f"stored keys include {sorted(stored)[:8]}.")
            if stored[key] != shape:
                raise ValueError(f"Shape mismatch at {key!r}: {where} has shape {stored[key]}, "
                                 f"the restore target has shape {shape}.")
        extra = sorted(stored.keys() - {keypath_str(p) for p, _ in target})
        if extra:
            raise ValueError(f"{where} has key {extra[0]!r} (shape {stored[extra[0]]}) that the "
                             f"restore target lacks ({len(extra)} such keys).")

    #### Preemption ####

    def reached_preemption(self, step: int) -> bool:
        """True on every process at the same step once any process got a preemption notice.

        Uses JAX's preemption sync manager (multi-host); False when it is not running
        (single process without jax.distributed). Call it at every step on every process.
        """
        return self._manager.reached_preemption(step)

    def install_sigterm_handler(self) -> Any:
        """Makes SIGTERM set a flag that should_stop() reports (call from the main thread).

        With several processes this installs nothing: JAX's coordination service owns SIGTERM
        there and reports it through reached_preemption() at the same step on every host,
        whereas a local flag would stop one host and deadlock the others.

        Returns:
          The previous SIGTERM handler (restored by close()), or None if nothing was installed.
        """
        if jax.process_count() > 1:
            logging.info("Multi-process run: SIGTERM is handled by JAX's preemption service.")
            return None

        def handler(signum: int, frame: Any) -> None:
            del frame
            logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
            self._stop.set()

        previous = signal.signal(signal.SIGTERM, handler)
        if not self._sigterm_installed:
            self._previous_sigterm_handler, self._sigterm_installed = previous, True
        return previous

    def should_stop(self, step: int | None = None) -> bool:
        """True once SIGTERM arrived or (given `step`) a preemption sync point is reached."""
        return self._stop.is_set() or (step is not None and self.reached_preemption(step))

    def close(self) -> None:
        """Waits for pending saves, closes the manager, restores the old SIGTERM handler."""
        self._manager.wait_until_finished()
        self._manager.close()
        if self._sigterm_installed:
            # None means the old handler was not set from Python; the default is closest.
            previous = self._previous_sigterm_handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            self._sigterm_installed = False
