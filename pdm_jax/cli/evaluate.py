"""ADM-compatible evaluator: ``python -m pdm_jax.cli.evaluate REF.npz SAMPLES.npz``.

    python -m pdm_jax.cli.evaluate ref.npz samples.npz --inception_path=inception.safetensors \\
        [--batch_size=256] [--json=metrics.json]

Each file is an image batch (``arr_0``) and/or statistics (see pdm_jax/evaluation/report.py);
the Inception network is loaded only when some file needs features computed. Prints ADM's
lines (Inception Score, FID, sFID, Precision, Recall).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("inception_path", "", "Converted Inception weights "
                    "(python -m pdm_jax.cli.convert_inception --out=PATH).")
flags.DEFINE_integer("batch_size", 256, "Images per Inception batch (a multiple of the device "
                     "count).")
flags.DEFINE_string("json", "", "Also write the metrics to this JSON file.")


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise app.UsageError(f"Expected two .npz files (REF SAMPLES), got {argv[1:]}.")
    from pdm_jax import io as io_lib
    from pdm_jax.evaluation import report

    ref_path, sample_path = argv[1:]
    # Everything that can be wrong with the inputs fails here, before any Inception pass.
    needed = [p for p in (ref_path, sample_path) if report.needs_features(p)]
    extractor = mesh = None
    if needed:
        if not FLAGS.inception_path:
            raise app.UsageError(f"{', '.join(needed)} hold(s) images: pass "
                                 f"--inception_path=PATH (python -m "
                                 f"pdm_jax.cli.convert_inception --out=PATH).")
        if not os.path.exists(FLAGS.inception_path):
            raise app.UsageError(f"--inception_path={FLAGS.inception_path} does not exist.")
        import jax

        from pdm_jax import sharding
        from pdm_jax.evaluation import inception

        if FLAGS.batch_size <= 0 or FLAGS.batch_size % jax.device_count():
            raise app.UsageError(f"--batch_size={FLAGS.batch_size} must be a positive multiple "
                                 f"of the {jax.device_count()} devices.")
        mesh = sharding.make_mesh((-1, 1))
        extractor = inception.load_inception(FLAGS.inception_path)

    print("computing reference batch statistics...", file=sys.stderr)
    ref = report.load_side(ref_path, extractor, mesh, FLAGS.batch_size)
    print("computing sample batch statistics...", file=sys.stderr)
    sample = report.load_side(sample_path, extractor, mesh, FLAGS.batch_size)
    result = report.compute_metrics(ref, sample)
    result.update(ref_batch=ref_path, sample_batch=sample_path)
    print(report.format_metrics(result))
    if FLAGS.json:
        io_lib.write_atomic(FLAGS.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
