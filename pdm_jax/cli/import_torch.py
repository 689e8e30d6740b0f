"""Imports the authors' PyTorch checkpoints into a pdm_jax export.

  python -m pdm_jax.cli.import_torch --checkpoint=ema_high.pt,ema_low.pt \\
      --config=configs/imagenet256.py --out=exports/imagenet256

One ``.pt`` per expert, in the order of the config's ``experts`` (one file for a single model).
Each file is a guided-diffusion ``state_dict`` (``torch.save(model.state_dict())``, e.g. the
released ``ema_0.9999_*.pt``); keys are mapped by models/torch_import.py, which refuses any key
that is unexpected, missing or misshapen for the config. torch is imported only there.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("checkpoint", None, "PyTorch .pt files, one per expert in config order.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:arg]) describing the "
                                "checkpoints' architecture.", lock_config=True)
flags.DEFINE_string("out", None, "Export directory to write.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "Export dtype (default: the config's export.dtype).")
flags.mark_flags_as_required(["checkpoint", "config", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from pdm_jax import config_validation, export_format

    config_validation.validate(FLAGS.config, "summary")
    out = export_format.export_torch_checkpoints(FLAGS.config, FLAGS.checkpoint, FLAGS.out,
                                                 FLAGS.dtype)
    print(f"Wrote {out}")


if __name__ == "__main__":
    app.run(main)
