"""Stop requests for a training loop: SIGTERM on one host, JAX's preemption sync point on many.

A spot/preemptible VM (or ``kill``) sends SIGTERM; the loop then saves the current step and
exits. With several processes a local flag would stop one host and leave the others waiting in
a collective, so there JAX's coordination service owns SIGTERM and reports it at the same step
on every process (``multihost_utils.reached_preemption_sync_point``).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
    """A context manager whose :meth:`should_stop` turns true on SIGTERM or preemption.

    Example:
      with StopRequest() as stop:
          for step in ...:
              ...
              if stop.should_stop(step):
                  save(step); break
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if jax.process_count() > 1:
            logging.info("Multi-process run: SIGTERM is handled by JAX's preemption service.")
            return self
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            # None means the old handler was not set from Python; the default is closest.
            signal.signal(signal.SIGTERM,
                          signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
        self._flag.set()

    def request(self) -> None:
        """Asks the loop to stop (what SIGTERM does)."""
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        """True once SIGTERM arrived, or at the preemption sync point of a multi-process run.

        Call it at every step on every process (the sync point is a collective decision).
        """
        if self._flag.is_set():
            return True
        return jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step)
