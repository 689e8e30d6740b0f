"""Entry point: ``python -m pdm_jax.main --config=configs/x.py[:args] --workdir=DIR --mode=M``.

Every mode but train reads the run's sections (data, model, diffusion, experts) from
``WORKDIR/config.json`` when it exists, so a run trained with overrides is sampled, evaluated
or exported without repeating them; overrides on this command line still win.
"""

import os

# Before TensorFlow or JAX initialise: keep TF's C++ logs quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib  # noqa: E402
import logging as pylogging  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
# --mode -> module of pdm_jax.jobs whose run(config, workdir) does it.
JOBS = {"train": "train", "sample": "sample", "summary": "summary", "export": "export",
        "analyze": "analyze", "eval": "evaluate", "ref_stats": "ref_stats",
        "prepare_data": "prepare_data"}
flags.DEFINE_enum("mode", "train", list(JOBS), "What to do.")
flags.DEFINE_string("export_dir", None, "--mode=export: output directory (same as "
                    "--config.export.dir; default WORKDIR/export).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: coordinator host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax/tfds/jax internals; their warnings still show."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/", "/etils/")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(
            part in record.pathname for part in self._NOISY)


def _with_run_config(config, workdir: str):
    """``config`` with the run's sections from ``WORKDIR/config.json`` (if any), overrides kept."""
    from pdm_jax import checkpointing, config_lib, run_loading

    try:
        run_config = run_loading.read_run_config(workdir)
    except FileNotFoundError:
        return config
    logging.info("Using the data/model/diffusion/experts sections of %s/%s.", workdir,
                 checkpointing.CONFIG_FILE)
    return config_lib.with_run_sections(config, run_config,
                                        config_flags.get_override_values(FLAGS["config"]))


def _default_compilation_cache() -> None:
    """A persistent XLA compilation cache unless one is configured: a restarted or resumed run
    loads its train step instead of compiling it again (seconds instead of minutes).

    Default ``$XDG_CACHE_HOME/pdm_jax/xla`` (``~/.cache/...``); JAX_COMPILATION_CACHE_DIR or
    --jax_compilation_cache_dir choose another, PDM_JAX_COMPILATION_CACHE=0 turns it off. A
    torn entry (a process killed while writing it) is reported by JAX and compiled again.
    """
    if jax.config.jax_compilation_cache_dir or os.environ.get("PDM_JAX_COMPILATION_CACHE") == "0":
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "pdm_jax", "xla"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _default_compilation_cache()
    from pdm_jax import distributed
    from pdm_jax.data import pipeline

    pipeline.hide_accelerators_from_tensorflow()  # tf.data must not take accelerator memory
    distributed.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                             FLAGS.process_id)
    config = FLAGS.config
    if FLAGS.mode != "train":
        config = _with_run_config(config, FLAGS.workdir)
    if FLAGS.export_dir:
        with config.unlocked():
            config.export.dir = FLAGS.export_dir
    job = importlib.import_module(f"pdm_jax.jobs.{JOBS[FLAGS.mode]}")
    job.run(config, FLAGS.workdir)


if __name__ == "__main__":
    jax.config.config_with_absl()  # --jax_* flags, e.g. --jax_compilation_cache_dir=DIR
    app.run(main)
