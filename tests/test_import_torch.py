"""PyTorch checkpoint -> export -> Pipeline round trip on the golden U-Net (authors' weights).

The golden file holds a randomised state_dict of the authors' tiny P=4 class-conditional U-Net
and its PyTorch output; here it goes through ``torch.save`` -> ``python -m
pdm_jax.cli.import_torch`` -> ``Pipeline.load`` and must reproduce that output; the library
function behind the command (``export_format.export_torch_checkpoints``) is called in-process.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, golden_torch_state
from pdm_jax import config_lib, export_format
from pdm_jax.inference import Pipeline

torch = pytest.importorskip("torch", reason="torch is not installed: the PyTorch import "
                                            "(pdm_jax.cli.import_torch) cannot be tested")

# A run config whose single U-Net is the golden one (constructor arguments in config_json).
GOLDEN_CONFIG = '''
import dataclasses, json
from pdm_jax import config_lib
from pdm_jax.models.torch_import import unet_config_from_torch_args

def get_config(arg=None):
    c = config_lib.base_config()
    model = dataclasses.asdict(unet_config_from_torch_args(json.loads(ARGS)))
    c.model.update(model)
    c.data.image_size = model["image_size"]
    c.data.class_conditional = True
    return c

ARGS = {args!r}
'''


@pytest.fixture(scope="module")
def golden(golden_dir):
    return np.load(golden_dir / "pdm_unet_tiny_p4_classcond.npz")


@pytest.fixture(scope="module")
def files(golden, tmp_path_factory):
    """The golden state_dict as a .pt file (torch.save of a dict of tensors) and its config."""
    root = tmp_path_factory.mktemp("torch_import")
    state = {k: torch.from_numpy(v.copy()) for k, v in golden_torch_state(golden).items()}
    torch.save(state, root / "golden.pt")
    (root / "golden_config.py").write_text(
        GOLDEN_CONFIG.format(args=str(golden["config_json"])))
    return root


@pytest.fixture(scope="module")
def imported(files):
    """``python -m pdm_jax.cli.import_torch`` in a subprocess (absl flags, fresh process)."""
    out = files / "export"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pdm_jax.cli.import_torch",
         f"--checkpoint={files / 'golden.pt'}", f"--config={files / 'golden_config.py'}",
         f"--out={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_import_writes_an_export_with_model_card(imported, golden):
    meta = json.loads((imported / "model.json").read_text())
    assert meta["dtype"] == "float32" and meta["num_classes"] == 1000
    assert [e["num_params"] for e in meta["experts"]] == [832_320]
    assert meta["source"]["pytorch_checkpoints"][0].endswith("golden.pt")
    assert sorted(os.listdir(imported)) == ["README.md", "model.json",
                                            "snr_0_inf.ema.safetensors"]
    assert "Imported from PyTorch" in (imported / "README.md").read_text()


def test_imported_export_reproduces_the_reference_output(imported, golden):
    pipeline = Pipeline.load(str(imported))
    assert pipeline.num_classes == 1000 and pipeline.image_size == 32
    mean, v = pipeline.forward(jnp.asarray(golden["input_x_nhwc"]),
                               jnp.asarray(golden["input_t"]), jnp.asarray(golden["input_y"]))
    reference = golden["output_nhwc"]
    # Tolerances of test_unet_golden (v's outliers are the reference's float32 rounding).
    assert np.abs(np.asarray(mean) - reference[..., :3]).max() <= 1e-4
    err = np.abs(np.asarray(v) - reference[..., 3:])
    assert np.quantile(err, 0.99) <= 1e-4 and err.mean() <= 1e-5 and err.max() <= 5e-3


def _config(files):
    return config_lib.load_config(files / "golden_config.py")


def import_checkpoints(config, checkpoints, out, dtype=None):
    """What ``python -m pdm_jax.cli.import_torch`` runs after validating the config."""
    return export_format.export_torch_checkpoints(config, checkpoints, out, dtype)


def test_import_refuses_bad_checkpoints_naming_file_and_key(files, tmp_path):
    config = _config(files)
    good = files / "golden.pt"
    with pytest.raises(ValueError, match="Got 2 checkpoint.*for 1 expert"):
        import_checkpoints(config, [str(good), str(good)], str(tmp_path / "two"))
    state = torch.load(good, weights_only=True)
    state["out.2.weight"] = state["out.2.weight"][:, :16]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt does not fit expert 0.*'out\.2\.weight'"):
        import_checkpoints(config, [str(tmp_path / "bad.pt")], str(tmp_path / "bad"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"Could not read PyTorch checkpoint .*junk\.pt"):
        import_checkpoints(config, [str(tmp_path / "junk.pt")], str(tmp_path / "junk"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "junk").exists()


def test_import_accepts_wrapped_state_dicts_and_bfloat16(files, tmp_path, golden):
    state = torch.load(files / "golden.pt", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "wrapped.pt")
    out = import_checkpoints(_config(files), [str(tmp_path / "wrapped.pt")],
                             str(tmp_path / "bf16"), dtype="bfloat16")
    from safetensors import safe_open
    with safe_open(os.path.join(out, "snr_0_inf.ema.safetensors"), framework="numpy") as f:
        kernel = f.get_tensor("out_conv/kernel")
    assert kernel.dtype.name == "bfloat16"
    expected = golden["torch_state/out.2.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_allclose(kernel.astype(np.float32), expected, rtol=1e-2, atol=1e-6)
    meta, _, params = export_format.read_export(out)
    assert meta["dtype"] == "bfloat16"
    assert params[0]["out_conv"]["kernel"].dtype == np.float32
