"""``--mode=prepare_data``: prepare the config's tfds dataset once, before a multi-host run.

Runs ``download_and_prepare`` into ``data.data_dir`` (a ``gs://`` path that every worker of the
later training run reads, e.g. ``--config.data.data_dir=gs://BUCKET/tensorflow_datasets``; empty
= ``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), reading ``data.manual_dir`` for datasets with a
manual download (ImageNet). It needs no accelerator and runs as ONE process: on any host that
reaches the bucket, or on a TPU slice's worker 0 (``launch/tpu.sh prepare_data``, JAX on the
CPU). A multi-process training run refuses to prepare anything but the demo dataset itself
(``datasets.check_available``), so every worker does not write its own copy. Nothing is
written to the workdir; preparing a prepared dataset does nothing.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from pdm_jax import config_validation
from pdm_jax.data import datasets


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Prepares ``config.data``'s dataset; returns its directory (``builder.data_dir``)."""
    del workdir  # The data lives in data.data_dir, shared by every run that reads it.
    config_validation.validate(config, "prepare_data")
    data_dir = datasets.prepare(config.data)
    logging.info("%s (split %s) is prepared in %s; train with --config.data.data_dir=%s.",
                 config.data.name, config.data.split, data_dir,
                 config.data.data_dir or "<the same default data dir>")
    return data_dir
