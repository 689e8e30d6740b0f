"""Samples an export: ``python -m pdm_jax.cli.sample_export --export_dir=OUT --num=16``.

Uses only the inference API (no orbax, no TensorFlow). Sampler settings default to the ones the
export's run config records (its ``sample`` section); flags override them. Writes a PNG grid
(``--out``) and optionally an .npz in ADM's layout (``--npz``).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("export_dir", None, "Export directory (--mode=export or cli.import_torch).")
flags.DEFINE_integer("num", 16, "Number of images.")
flags.DEFINE_string("out", "grid.png", "PNG grid of the images ('' for none).")
flags.DEFINE_string("npz", "", "Optional .npz with arr_0 uint8 NHWC images, arr_1 labels.")
flags.DEFINE_list("labels", None, "One class for all, or one per image (default balanced).")
flags.DEFINE_string("steps", None, "Respacing: 250, 50, ddim25 (default: the export's).")
flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Sampler (default: the export's).")
flags.DEFINE_float("eta", None, "DDIM eta (default: the export's).")
flags.DEFINE_float("guidance_scale", None, "Guidance w (default: the export's).")
flags.DEFINE_integer("seed", None, "Seed (default: the export's sample.seed).")
flags.DEFINE_integer("batch_size", None, "Images per call, a multiple of the device count.")
flags.DEFINE_bool("raw", False, "Use the raw (non-EMA) parameters, if exported.")
flags.mark_flags_as_required(["export_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from pdm_jax import io as io_lib
    from pdm_jax import sampling
    from pdm_jax.inference import Pipeline

    labels = None
    if FLAGS.labels:
        try:
            labels = [int(v) for v in FLAGS.labels]
        except ValueError as e:
            raise app.UsageError(f"--labels={','.join(FLAGS.labels)}: expected ints.") from e
        labels = labels[0] if len(labels) == 1 else labels
    pipeline = Pipeline.load(FLAGS.export_dir, raw=FLAGS.raw)
    s = pipeline.config.sample

    def pick(flag, default):
        return default if flag is None else flag

    images, used = pipeline.sample(
        FLAGS.num, labels=labels, steps=pick(FLAGS.steps, s.steps),
        sampler=pick(FLAGS.sampler, s.sampler), eta=pick(FLAGS.eta, s.eta),
        guidance_scale=pick(FLAGS.guidance_scale, s.guidance_scale),
        seed=pick(FLAGS.seed, s.seed), batch_size=FLAGS.batch_size, return_labels=True)
    if FLAGS.out:
        # Balanced labels (i mod classes) get a column per class.
        columns = sampling.grid_columns(len(images), pipeline.num_classes) if labels is None \
            else None
        io_lib.save_png(FLAGS.out, io_lib.image_grid(images, columns))
        logging.info("Wrote %s", FLAGS.out)
    if FLAGS.npz:
        io_lib.save_samples_npz(FLAGS.npz, images, used)
        logging.info("Wrote %s", FLAGS.npz)


if __name__ == "__main__":
    app.run(main)
