"""Metric writers (clu: TensorBoard, ``metrics.jsonl``, the log) and progress reports.

``metrics.jsonl`` holds one JSON object per ``write_scalars`` call: ``{"step": s, name: value,
...}``; a step may have several records (losses, rates, eval/*), with disjoint keys. The file is
meant to survive hard kills (SIGKILL, a lost VM): lines are written whole and flushed, the
training loop flushes every writer before a checkpoint starts, and :func:`repair_jsonl` drops,
when a run resumes from step s, a torn last line and every record of a step after s (the
killed run logged them, the resumed run logs them again), so each step is written by exactly
the run whose checkpoint it leads to. TensorBoard event files cannot be rewritten that way:
after a resume TensorBoard may show both versions of the steps between the last checkpoint and
the kill.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import jax
import tensorflow as tf
from absl import logging
from clu import metric_writers, periodic_actions, platform

from pdm_jax import io as io_lib

METRICS_FILE = "metrics.jsonl"


def repair_jsonl(path: str, keep_through_step: int | None = None) -> int:
    """Drops a torn last line and (optionally) records after a step; rewrites atomically.

    Args:
      path: the metrics file (local or gs://); nothing happens if it does not exist.
      keep_through_step: drop records whose step is larger (None keeps every whole record).

    Returns:
      The number of records or fragments dropped.
    """
    if not tf.io.gfile.exists(path):
        return 0
    with tf.io.gfile.GFile(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    kept, dropped = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a torn line: cut mid-write by a kill
            dropped += 1
            continue
        if keep_through_step is not None and step > keep_through_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        io_lib.write_atomic(path, "".join(line + "\n" for line in kept))
        logging.info("%s: dropped %d torn record(s) or record(s) after step %s.", path, dropped,
                     keep_through_step)
    return dropped


class JsonlWriter(metric_writers.interface.MetricWriter):
    """Appends one JSON line per ``write_scalars`` call, written whole and flushed at once."""

    def __init__(self, path: str):
        self._path = path
        self._file = tf.io.gfile.GFile(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        # allow_nan: a non-finite value is the record of a failure, not a reason to lose it.
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def metrics_path(workdir: str, expert_name: str | None = None) -> str:
    """``WORKDIR/metrics.jsonl``, or ``metrics.<expert>.jsonl`` for a run of one expert of several
    (runs of different experts may share a workdir, even at the same time)."""
    return f"{workdir}/{METRICS_FILE if expert_name is None else f'metrics.{expert_name}.jsonl'}"


def create_writer(workdir: str, tensorboard: bool = True, resume_step: int | None = None,
                  name: str | None = None) -> metric_writers.MetricWriter:
    """Process 0 writes TensorBoard events, the metrics file and log lines; others only log.

    Args:
      workdir: run directory (local or gs://).
      tensorboard: also write TensorBoard event files (WORKDIR, or WORKDIR/tb_<name>).
      resume_step: the step a run resumes from; records of later steps (logged by a run that
        was killed before its next checkpoint) are dropped from the metrics file first.
      name: the expert a run trains alone (see :func:`metrics_path`); None for whole runs.

    Returns:
      A clu MetricWriter; ``flush()`` waits until every queued record is on disk.
    """
    if jax.process_index() > 0:
        return metric_writers.LoggingWriter()
    path = metrics_path(workdir, name)
    repair_jsonl(path, resume_step)
    writers = [metric_writers.LoggingWriter(), JsonlWriter(path)]
    if tensorboard:
        writers.append(metric_writers.SummaryWriter(
            workdir if name is None else f"{workdir}/tb_{name}"))
    return metric_writers.AsyncMultiWriter(writers)


def format_duration(seconds: float) -> str:
    """'1h02m03s' ('?' for an unknown duration)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class ReportProgress(periodic_actions.ReportProgress):
    """clu's progress report, in our units: 'steps/s, images/s, %, ETA' in the log.

    Call it once with the starting step (that call never reports), then after every step.
    Rates go to ``writer`` (if given) as ``steps_per_s`` and ``<unit>_per_s``.

    Args:
      num_steps: total steps (train steps, or sampler batches).
      items_per_step: images per step (global batch size).
      writer: where the rates go; None logs only.
      what: the word for a step in the log line ('step', 'batch').
      every_steps / every_secs: how often to report.
    """

    def __init__(self, *, num_steps: int, items_per_step: int,
                 writer: metric_writers.MetricWriter | None = None, what: str = "step",
                 every_steps: int | None = None, every_secs: float | None = 60.0):
        super().__init__(num_train_steps=num_steps, writer=None, every_steps=every_steps,
                         every_secs=every_secs)
        self._rate_writer, self._items, self._what = writer, items_per_step, what

    def _apply(self, step: int, t: float) -> None:
        steps_per_s = (step - self._previous_step) / max(t - self._previous_time, 1e-9)
        total = self._num_train_steps
        eta = (total - step) / steps_per_s if steps_per_s > 0 else math.inf
        plural = self._what + ("es" if self._what.endswith("ch") else "s")
        message = (f"{self._what} {step}/{total} ({100 * step / total:.1f}%): "
                   f"{steps_per_s:.3g} {plural}/s, {steps_per_s * self._items:.3g} images/s, "
                   f"ETA {format_duration(eta)}")
        platform.work_unit().set_notes(message)  # logged by the local platform
        if self._rate_writer is not None:
            self._rate_writer.write_scalars(step, {
                "steps_per_s": steps_per_s, "images_per_s": steps_per_s * self._items})
