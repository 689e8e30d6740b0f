"""Imports the authors' PyTorch checkpoints into a pdm_jax export.

  python -m pdm_jax.import_torch --checkpoint=ema_high.pt,ema_low.pt \\
      --config=configs/imagenet256.py --out=exports/imagenet256

One ``.pt`` per expert, in the order of the config's ``experts`` (one file for a single model).
Each file is a guided-diffusion ``state_dict`` (``torch.save(model.state_dict())``, e.g. the
released ``ema_0.9999_*.pt``); keys are mapped by models/torch_import.py, which refuses any key
that is unexpected, missing or misshapen for the config. torch is imported only here.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from typing import Sequence  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this command's absl flags; called only when it runs as a command, so that
    importing the module never clashes with pdm_jax.main's flags (--config, --export_dir)."""
    if "out" in FLAGS and "checkpoint" in FLAGS:
        return
    flags.DEFINE_list("checkpoint", None, "PyTorch .pt files, one per expert in config order.")
    config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:arg]) describing "
                                    "the checkpoints' architecture.", lock_config=True)
    flags.DEFINE_string("out", None, "Export directory to write.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                      "Export dtype (default: the config's export.dtype).")
    flags.mark_flags_as_required(["checkpoint", "config", "out"])


# Wrappers some training scripts put around the state_dict.
_WRAPPER_KEYS = ("state_dict", "model", "ema")


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state_dict file as {key: float32 numpy array}.

    Accepts a plain state_dict, or a dict holding one under 'state_dict'/'model'/'ema'; a
    'module.' prefix (DataParallel) is stripped. Loaded with ``weights_only=True``: no code in
    the file runs.

    Raises:
      FileNotFoundError / ValueError: naming the file.
    """
    import torch  # the only torch user in pdm_jax

    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad files
        raise ValueError(f"Could not read PyTorch checkpoint {path}: {e}") from e
    if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors); got "
                         f"{type(obj).__name__}.")
    return {k.removeprefix("module."): v.detach().float().cpu().numpy() for k, v in obj.items()}


def import_checkpoints(config: ml_collections.ConfigDict, checkpoints: Sequence[str], out: str,
                       dtype: str | None = None) -> str:
    """Converts one PyTorch state_dict per expert into an export at ``out``.

    Args:
      config: a run config whose experts' U-Nets match the checkpoints.
      checkpoints: .pt paths in the config's expert order.
      out: export directory (written atomically).
      dtype: 'float32' / 'bfloat16'; default ``config.export.dtype``.

    Returns:
      ``out``.

    Raises:
      ValueError: wrong number of files, unreadable files, or keys/shapes not matching the
        config, naming the file and the first offending key.
    """
    from flax import nnx

    from pdm_jax import config_lib, export_format
    from pdm_jax.experts import experts_from_config
    from pdm_jax.models.torch_import import load_torch_state_dict
    from pdm_jax.models.unet import UNet

    config_lib.validate(config)
    dtype = export_format.check_dtype(dtype or config.export.dtype)
    experts = experts_from_config(config)
    if len(checkpoints) != len(experts):
        raise ValueError(f"Got {len(checkpoints)} checkpoint(s) {list(checkpoints)} for "
                         f"{len(experts)} expert(s): pass one .pt per expert, in config order.")
    params = []
    for expert, path in zip(experts, checkpoints):
        state_dict = read_torch_state_dict(path)
        model = nnx.eval_shape(lambda e=expert: UNet(e.model, rngs=nnx.Rngs(0)))
        try:
            load_torch_state_dict(model, state_dict)
        except ValueError as e:
            raise ValueError(f"{path} does not fit {expert.describe()}: {e}") from e
        params.append({"ema": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
        logging.info("Imported %s for %s", path, expert.describe())
    return export_format.write_export(
        out, config, params, [0] * len(experts), dtype=dtype,
        source={"pytorch_checkpoints": [os.path.abspath(p) for p in checkpoints]},
        card_notes="Imported from PyTorch checkpoints of the authors' implementation "
                   "(`python -m pdm_jax.import_torch`); the step is unknown and recorded as 0.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    out = import_checkpoints(FLAGS.config, FLAGS.checkpoint, FLAGS.out, FLAGS.dtype)
    print(f"Wrote {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
