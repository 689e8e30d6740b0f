"""Entry point: ``python -m pdm_jax.main --config=configs/x.py[:args] --workdir=DIR --mode=M``."""

import os

# Before TensorFlow or JAX initialise: keep TF's C++ logs quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging as pylogging  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
flags.DEFINE_enum("mode", "train", ["train", "sample", "summary", "export", "analyze", "eval",
                                   "ref_stats"], "What to do.")
flags.DEFINE_string("export_dir", None, "--mode=export: output directory (default WORKDIR/export).")
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from pdm_jax import sharding  # deferred: imports TensorFlow and orbax

    # tf.data must never take accelerator memory (pdm_jax.data hides GPUs/TPUs from TF).
    import pdm_jax.data.pipeline  # noqa: F401

    sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id)
    logging.info("Process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    config = FLAGS.config
    if FLAGS.mode == "train":
        from pdm_jax import train
        train.train(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        from pdm_jax import sample
        sample.run(config, FLAGS.workdir)
    elif FLAGS.mode == "summary":
        from pdm_jax import summary
        result = summary.summarize(config, FLAGS.workdir)
        print(summary.format_table(result))
    elif FLAGS.mode == "export":
        from pdm_jax import export
        export.run(config, FLAGS.workdir, FLAGS.export_dir)
    elif FLAGS.mode == "analyze":
        from pdm_jax import analyze
        analyze.run(config, FLAGS.workdir)
    elif FLAGS.mode == "eval":
        from pdm_jax import eval_run
        eval_run.run_eval(config, FLAGS.workdir)
    elif FLAGS.mode == "ref_stats":
        from pdm_jax import eval_run
        eval_run.run_ref_stats(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
