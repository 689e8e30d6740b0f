"""Import of the authors' PyTorch state_dict (guided-diffusion key names) into our U-Net.

This is how users holding the released PDM checkpoints load them, and how the golden parity test
loads the reference weights. Layout conversions: conv OIHW -> HWIO, linear (out, in) -> (in, out),
1-D attention convs (out, in, 1) -> (1, 1, in, out), GroupNorm weight -> scale.
torch is NOT needed: the state_dict is passed as a mapping of numpy arrays (e.g. from
``{k: v.numpy() for k, v in torch.load(f).items()}`` or an ``.npz``).
"""

from __future__ import annotations

import os

import re
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from pdm_jax.models.unet import UNet, UNetConfig

Path = tuple

_RESBLOCK = {
    "in_layers.0": ("in_norm", "norm"),
    "in_layers.2": ("in_conv", "conv"),
    "emb_layers": ("emb_proj", "linear"),
    "out_layers.2": ("out_conv", "conv"),
    "classemb_proj": ("class_proj", "linear"),
    "skip_connection": ("skip", "conv"),
}
_ATTENTION = {"norm": ("norm", "norm"), "qkv": ("qkv", "conv1d"), "proj_out": ("proj_out", "conv1d")}
_TOP_LEVEL = {
    "time_embed.0": (("time_mlp_in",), "linear"),
    "time_embed.2": (("time_mlp_out",), "linear"),
    "input_blocks.0.0": (("input_conv",), "conv"),
    "out.0": (("out_norm",), "norm"),
    "out.2": (("out_conv",), "conv"),
    "variance_output_t_emb": (("var_time_proj",), "conv_as_linear"),
    "variance_output_model.0": (("var_conv_1",), "conv"),
    "variance_output_model.2": (("var_conv_2",), "conv"),
}


def _convert(kind: str, param: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Maps one torch tensor to (our parameter name, our layout)."""
    if kind == "norm":
        return ("scale" if param == "weight" else "bias"), value
    if param == "bias":
        return "bias", value
    if kind == "linear":
        return "kernel", value.T
    if kind == "conv":
        return "kernel", value.transpose(2, 3, 1, 0)
    if kind == "conv1d":
        return "kernel", value[:, :, 0].T[None, None]
    if kind == "conv_as_linear":
        return "kernel", value[:, :, 0, 0].T
    raise AssertionError(kind)


def _target_path(key: str, stage_kinds: dict[str, list[str]]) -> tuple[Path, str, str]:
    """Returns (module path, layout kind, torch parameter name) for one torch key."""
    module, _, param = key.rpartition(".")
    if module in _TOP_LEVEL:
        path, kind = _TOP_LEVEL[module]
        return path, kind, param
    if module == "label_embs":
        return ("label_emb",), "embedding", param
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?\.(.+)", module)
    if m is None:
        raise ValueError(f"Unexpected key {key!r} in the PyTorch state_dict.")
    group, first, second, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if group == "middle_block":
        # torch middle_block = [ResBlock, Attention, ResBlock]; ours = [Stage(res, attn), Stage(res)].
        stage, layer = {0: (0, "res"), 1: (0, "attn"), 2: (1, "res")}[first], None
        stage_index, layer = stage
        rest = f"{second}.{rest}" if second is not None else rest
    else:
        stage_index = first - 1 if group == "input_blocks" else first
        layer = stage_kinds[group][stage_index][int(second)]
    if layer == "down":
        return (group, stage_index, "down", "conv"), "conv", param
    if layer == "up":
        return (group, stage_index, "up", "conv"), "conv", param
    table = _RESBLOCK if layer == "res" else _ATTENTION
    if rest not in table:
        raise ValueError(f"Unexpected key {key!r} in the PyTorch state_dict.")
    name, kind = table[rest]
    return (group, stage_index, layer, name), kind, param


def _stage_layouts(model: UNet) -> dict[str, list[list[str]]]:
    """For each of our stages, the order of its layers as torch numbers them."""
    layouts = {}
    for group in ("input_blocks", "output_blocks"):
        layouts[group] = [
            [name for name in ("down", "res", "attn", "up") if getattr(s, name) is not None]
            for s in getattr(model, group)]
    return layouts


def _place_like(value: np.ndarray, current) -> np.ndarray | jax.Array:
    """``value`` on the devices of the parameter it replaces; host memory for an abstract one.

    A parameter left as a numpy array would be copied to the device again by every jitted call
    that takes it (121 M parameters: about 0.2 s per call on a 2-core CPU). An abstract model
    (``nnx.eval_shape``, the export path) has no devices: its values stay on the host.
    """
    if isinstance(current, jax.Array):
        return jax.device_put(value, current.sharding)
    return value


def load_torch_state_dict(model: UNet, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copies a PyTorch PDM/guided-diffusion state_dict into ``model`` in place.

    Each value lands where the parameter it replaces lives (same devices and sharding), so a
    concrete model is ready to run; an abstract one (``nnx.eval_shape``) gets host arrays.

    Args:
      model: a UNet built with the matching UNetConfig (concrete or abstract).
      state_dict: torch key -> numpy array (float).

    Raises:
      ValueError: naming the first key that is unexpected, missing, or of the wrong shape.
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_ours = dict(nnx.traversals.flatten_mapping(params))
    stage_kinds = _stage_layouts(model)
    assigned = {}
    for key in sorted(state_dict):
        value = np.asarray(state_dict[key], dtype=np.float32)
        module_path, kind, param = _target_path(key, stage_kinds)
        if kind == "embedding":
            name, converted = "embedding", value
        else:
            name, converted = _convert(kind, param, value)
        path = module_path + (name,)
        if path not in flat_ours:
            raise ValueError(f"PyTorch key {key!r} maps to {'/'.join(map(str, path))}, which this "
                             f"U-Net config does not have (wrong config for this checkpoint?).")
        expected = flat_ours[path].shape
        if converted.shape != expected:
            raise ValueError(f"Shape mismatch for PyTorch key {key!r}: {value.shape} converts to "
                             f"{converted.shape}, our parameter {'/'.join(map(str, path))} is "
                             f"{expected}.")
        assigned[path] = _place_like(converted, flat_ours[path])
    missing = [p for p in flat_ours if p not in assigned]
    if missing:
        raise ValueError(f"The PyTorch state_dict lacks {len(missing)} of our parameters, first "
                         f"{'/'.join(map(str, missing[0]))}.")
    nnx.update(model, nnx.traversals.unflatten_mapping(assigned))


def unet_config_from_torch_args(args: Mapping) -> UNetConfig:
    """UNetConfig from the reference's constructor arguments (e.g. the golden ``config_json``).

    Args:
      args: guided-diffusion style arguments: image_size, num_channels, num_res_blocks,
        patch_size, channel_mult ("1,2"), attention_resolutions ("8,4", patched), class_cond,
        learn_sigma, num_head_channels, dropout.

    Returns:
      The matching UNetConfig with the PyTorch port's norm epsilons (1e-5 affine, 1e-3 out-norm).
    """
    def ints(value):
        return tuple(float(v) if "." in v else int(v) for v in str(value).split(","))

    if not args.get("use_scale_shift_norm", True) or not args.get("use_new_attention_order", True):
        raise ValueError("Only scale-shift norm with the new attention order is supported.")
    return UNetConfig(
        image_size=int(args["image_size"]), patch_size=int(args.get("patch_size", 1)),
        model_channels=int(args["num_channels"]), channel_mult=ints(args["channel_mult"]),
        num_res_blocks=int(args["num_res_blocks"]),
        attention_resolutions=ints(args["attention_resolutions"]),
        num_head_channels=int(args.get("num_head_channels", 64)),
        num_classes=1000 if args.get("class_cond") else 0,
        learn_sigma=bool(args.get("learn_sigma", True)), dropout=float(args.get("dropout", 0.0)),
        norm_eps=1e-5, out_norm_eps=1e-3)


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
