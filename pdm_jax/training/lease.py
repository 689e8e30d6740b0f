"""A workdir belongs to one run: leases on the experts a training run writes.

Two trainers writing one expert's checkpoints corrupt each other (e.g. a relaunch while the old
run still lives). Before it builds anything, a run takes a lease per trained expert: a small JSON
file ``WORKDIR/leases/<expert name>.json`` naming the holder (host, pid, start time, command)
that process 0 rewrites every ``HEARTBEAT_S`` seconds. A second run finds a fresh lease and
refuses to start, naming the holder; a lease whose holder died (kill -9, a lost VM) goes stale
and is taken over: at once when the holder was a process of this host that no longer exists,
otherwise once its heartbeat is older than ``EXPIRY_S``. Runs that train different experts of
one workdir (``train.expert=K``) do not conflict. Only process 0 of a multi-host run touches
the lease, so the processes of one run are never each other's rivals. Works on any path
etils.epath can write (local and gs://): ownership is checked by reading the file back.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from pdm_jax import checkpointing, io as io_lib

HEARTBEAT_S = 30.0
EXPIRY_S = 300.0
_SETTLE_S = 0.5  # lets a concurrent writer's lease land before ours is read back


class WorkdirBusyError(RuntimeError):
    """Another live run holds a lease on what this run would write."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: epath.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign file: nobody holds it
        return None


def describe_holder(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}, last "
            f"heartbeat {age:.0f} s ago ({holder.get('command', '?')})")


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether a lease's holder is gone: dead on this host, or silent for EXPIRY_S."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return True
    return now - float(holder.get("heartbeat", 0)) > EXPIRY_S


class Lease:
    """Leases of one run on the experts it trains; a context manager (see module docstring).

    Args:
      workdir: the run directory.
      names: the trained experts' names.
      take_over: start even if a holder looks alive (``--config.train.take_over=True``).
    """

    def __init__(self, workdir: str, names: Sequence[str], *, take_over: bool = False):
        self._paths = [epath.Path(workdir) / "leases" / f"{name}.json" for name in sorted(names)]
        self._take_over = take_over
        self._record = {"run": uuid.uuid4().hex, "host": socket.gethostname(),
                        "pid": os.getpid(), "started": time.time(),
                        "command": " ".join(sys.argv)[:500]}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def acquire(self) -> None:
        """Takes every lease or none.

        Raises:
          WorkdirBusyError: a live run holds one of them, naming it and how to override.
        """
        for path in self._paths:
            holder = _read(path)
            if holder and holder.get("run") != self._record["run"] and not is_stale(holder):
                if not self._take_over:
                    raise WorkdirBusyError(
                        f"{path} is held by a live run ({describe_holder(holder)}); two "
                        f"trainers on one workdir corrupt it. Stop that run first, or, if it "
                        f"is dead on another host, wait {EXPIRY_S:.0f} s for its lease to "
                        f"expire or pass --config.train.take_over=True.")
                logging.warning("Taking over %s from %s (train.take_over=True).", path,
                                describe_holder(holder))
            elif holder and holder.get("run") != self._record["run"]:
                logging.warning("Taking over the stale lease %s of %s.", path,
                                describe_holder(holder))
        self._write()
        time.sleep(_SETTLE_S)
        for path in self._paths:
            holder = _read(path)
            if not holder or holder.get("run") != self._record["run"]:
                raise WorkdirBusyError(f"{path} was taken at the same moment by "
                                       f"{describe_holder(holder or {})}; not starting.")
        self._thread = threading.Thread(target=self._heartbeat, name="pdm_jax_lease",
                                        daemon=True)
        self._thread.start()

    def _write(self) -> None:
        record = dict(self._record, heartbeat=time.time())
        for path in self._paths:
            io_lib.write_atomic(path, json.dumps(record))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for path in self._paths:
                holder = _read(path)
                if holder is not None and holder.get("run") != self._record["run"]:
                    logging.error("Lost the lease %s to %s: this run stops without saving.",
                                  path, describe_holder(holder))
                    self.lost.set()
                    return
            try:
                self._write()
            except OSError as e:  # a storage hiccup: the next beat retries
                logging.warning("Lease heartbeat failed: %s", e)

    def release(self) -> None:
        """Stops the heartbeat and removes the leases this run still holds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost.is_set():
            return
        for path in self._paths:
            holder = _read(path)
            if holder is not None and holder.get("run") == self._record["run"]:
                path.unlink()

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str, names: Sequence[str], *, take_over: bool = False) -> Iterator[Lease | None]:
    """Process 0 takes the run's leases, every process learns the verdict; released on exit.

    Yields:
      The Lease on process 0 (watch ``lease.lost``), None on the others.

    Raises:
      WorkdirBusyError: on every process, when a live run holds one of the leases.
    """
    lease, error = None, ""
    if jax.process_index() == 0:
        lease = Lease(workdir, names, take_over=take_over)
        try:
            lease.acquire()
        except WorkdirBusyError as e:
            lease, error = None, str(e)
    if jax.process_count() > 1:
        checkpointing.wait_for_all_processes("pdm_jax_lease_checked")
        if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
            error = "Process 0 found the workdir held by another run (its log names the holder)."
    if error:
        raise WorkdirBusyError(error)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()
