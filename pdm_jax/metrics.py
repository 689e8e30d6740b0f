"""What users look at: metric writers (TensorBoard + JSONL), progress lines, image grids."""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any, Mapping

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from clu import metric_writers

from pdm_jax.images import image_grid, png_bytes, to_uint8  # noqa: F401 (re-exported)


class JsonlWriter(metric_writers.interface.MetricWriter):
    """Appends one JSON object per write_scalars call to ``<workdir>/metrics.jsonl``."""

    def __init__(self, path: str):
        self._path = path
        self._file = tf.io.gfile.GFile(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")

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


def create_writer(workdir: str, tensorboard: bool = True) -> metric_writers.MetricWriter:
    """Process 0 writes TensorBoard events, metrics.jsonl and log lines; others only log.

    Args:
      workdir: run directory (local or gs://).
      tensorboard: also write TensorBoard event files.

    Returns:
      A clu MetricWriter.
    """
    if jax.process_index() > 0:
        return metric_writers.LoggingWriter()
    writers = [metric_writers.LoggingWriter(), JsonlWriter(f"{workdir}/metrics.jsonl")]
    if tensorboard:
        writers.append(metric_writers.SummaryWriter(workdir))
    return metric_writers.AsyncMultiWriter(writers)


class Progress:
    """Formats 'step, loss, steps/s, images/s, ETA' lines for a run of ``total_steps``."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total_steps, self.batch_size = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()

    def line(self, step: int, scalars: Mapping[str, float]) -> tuple[str, dict[str, float]]:
        """Returns the progress line and the throughput scalars since the previous call."""
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else math.inf
        rates = {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.batch_size}
        values = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        return (f"step {step}/{self.total_steps} {values} | {steps_per_s:.3g} steps/s, "
                f"{rates['images_per_s']:.3g} images/s, ETA {format_duration(eta)}"), rates


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def save_npz_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` as one .npz (local or gs://) through a temporary file renamed at the
    end, so a reader never sees a half-written file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)


def save_png(path: str, image: np.ndarray, min_size: int = 256) -> None:
    """Writes a uint8 HWC image as PNG (local or gs://), upscaled (nearest) to >= min_size px."""
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(png_bytes(image, min_size))
    logging.info("Wrote %s", path)
