"""--mode=export and the standalone inference API, end to end on 8 virtual CPU devices.

A two-expert ``configs/demo.py:smoke`` workdir holding checkpoints of random weights (what is
tested here needs no training) is sampled with ``--mode=sample`` and exported (fp32 with raw
parameters, and bf16); a fresh Python process loads the fp32 export through
``pdm_jax.Pipeline`` and ``python -m pdm_jax.cli.sample_export`` with neither orbax nor
TensorFlow imported, reproducing ``--mode=sample``'s images bit for bit. The session's
persistent XLA cache lets the subprocess load the sampler compiled here.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from conftest import REPO, folder_config, write_random_run
from pdm_jax import export_format
from pdm_jax.inference import Pipeline
from pdm_jax.jobs import export, sample

pytestmark = pytest.mark.slow

EXPERTS = ("snr_0.25_inf", "snr_0_0.25")  # the smoke ensemble's expert names
NUM, BATCH = 20, 16  # two sampler calls, the second cut to 4 images
STEP = 7  # the checkpoints' step


@pytest.fixture(scope="module")
def run(folder16, tmp_path_factory):
    """``--mode=sample`` and two exports of a workdir with random checkpoints at STEP."""
    root = tmp_path_factory.mktemp("export_run")
    config = folder_config(folder16, num_steps=STEP, ckpt_every=STEP)
    config.sample.update(num_samples=NUM, batch_size=BATCH, name="ref", seed=3)
    workdir = root / "workdir"
    final = write_random_run(workdir, config, STEP)
    npz = sample.run(config, str(workdir))
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    config.export.update(include_raw=True, dir=str(root / "fp32"))
    fp32 = export.run(config, str(workdir))
    config.export.update(include_raw=False, dtype="bfloat16", dir=str(root / "bf16"))
    bf16 = export.run(config, str(workdir))
    states = [jax.device_get(final[name]) for name in EXPERTS]
    return types.SimpleNamespace(config=config, workdir=workdir, root=root, images=images,
                                 labels=labels, fp32=pathlib.Path(fp32),
                                 bf16=pathlib.Path(bf16), states=states)


def test_export_dir_defaults_to_the_workdir(run, tmp_path):
    config = run.config.copy_and_resolve_references()
    config.export.update(dir="", dtype="bfloat16", include_raw=False)
    workdir = tmp_path / "copy"
    shutil.copytree(run.workdir, workdir, ignore=shutil.ignore_patterns("leases"))
    assert export.run(config, str(workdir)) == str(workdir / "export")
    assert sorted(os.listdir(workdir / "export")) == sorted(os.listdir(run.bf16))


def test_export_layout_model_json_and_card(run):
    assert sorted(os.listdir(run.fp32)) == sorted(
        ["README.md", "model.json"] + [f"{e}.{k}.safetensors" for e in EXPERTS
                                       for k in ("ema", "raw")])
    assert sorted(os.listdir(run.bf16)) == sorted(
        ["README.md", "model.json"] + [f"{e}.ema.safetensors" for e in EXPERTS])
    assert not [p for p in os.listdir(run.root) if ".tmp-" in p or ".old-" in p]
    meta = json.loads((run.fp32 / "model.json").read_text())
    assert meta["step"] == STEP and meta["dtype"] == "float32" and meta["num_classes"] == 6
    assert meta["config_hash"] == export_format.config_hash(run.config)
    assert [(e["name"], e["snr_interval"], e["model"]["patch_size"], e["step"])
            for e in meta["experts"]] == [(EXPERTS[0], [0.25, float("inf")], 2, STEP),
                                          (EXPERTS[1], [0.0, 0.25], 4, STEP)]
    assert meta["config"]["diffusion"] == run.config.diffusion.to_dict()
    card = (run.fp32 / "README.md").read_text()
    assert "`folder` at 16x16, 6 classes" in card and f"step {STEP}" in card
    assert f"| 1 `{EXPERTS[1]}` | (0, 0.25] | 4 |" in card


def test_exported_tensors_are_the_checkpoint_ema_and_raw_params(run):
    for index, name in enumerate(EXPERTS):
        for kind, key in (("ema", "ema"), ("raw", "params")):
            stored = safetensors.numpy.load_file(str(run.fp32 / f"{name}.{kind}.safetensors"))
            expected = export_format.flatten_params(jax.device_get(run.states[index][key]))
            assert stored.keys() == expected.keys()
            for k in expected:
                assert stored[k].dtype == np.float32
                np.testing.assert_array_equal(stored[k], expected[k], err_msg=f"{name} {k}")
        # Independent random EMA and raw parameters: the export must not mix them up.
        assert not np.array_equal(stored["out_conv/kernel"],
                                  export_format.flatten_params(
                                      jax.device_get(run.states[index]["ema"]))["out_conv/kernel"])
        bf16 = safetensors.numpy.load_file(str(run.bf16 / f"{name}.ema.safetensors"))
        ema = export_format.flatten_params(jax.device_get(run.states[index]["ema"]))
        for k in ema:
            assert bf16[k].dtype.name == "bfloat16"
            np.testing.assert_allclose(bf16[k].astype(np.float32), ema[k], rtol=2**-8, atol=0)


SUBPROCESS = textwrap.dedent('''
    import sys
    import time
    import numpy as np
    from absl import app
    import pdm_jax

    export_dir, out = sys.argv[1], sys.argv[2]
    assert "pdm_jax.inference" not in sys.modules  # Pipeline is imported lazily
    pipeline = pdm_jax.Pipeline.load(export_dir)
    s = pipeline.config.sample
    start = time.perf_counter()
    images, labels = pipeline.sample({num}, steps=s.steps, sampler=s.sampler, eta=s.eta,
                                     guidance_scale=s.guidance_scale, seed=s.seed,
                                     batch_size={batch}, return_labels=True)
    print(f"Pipeline.sample: {{time.perf_counter() - start:.1f}} s", file=sys.stderr)
    from pdm_jax.cli import sample_export
    sys.argv = ["sample_export", f"--export_dir={{export_dir}}", "--num=3",
                f"--batch_size={batch}", f"--out={{out}}/grid.png", f"--npz={{out}}/cli.npz"]
    try:
        app.run(sample_export.main)
    except SystemExit as e:
        assert not e.code, e.code
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("orbax", "tensorflow", "torch",
                                                                  "tensorflow_datasets", "clu"))
    np.savez(f"{{out}}/api.npz", images=images, labels=labels, heavy=np.array(heavy, str))
''')


@pytest.fixture(scope="module")
def fresh_process(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("fresh")
    # Same devices, numerics and session XLA cache as this process (conftest sets them).
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS.format(num=NUM, batch=BATCH), str(run.fp32), str(out)],
        cwd=out, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stderr[-2000:])  # shown with -s / on failure: timings of the fresh process
    return out


def test_pipeline_in_a_fresh_process_reproduces_mode_sample_without_orbax_or_tf(
        run, fresh_process):
    with np.load(fresh_process / "api.npz") as data:
        assert list(data["heavy"]) == []
        assert data["images"].dtype == np.uint8 and data["images"].shape == (NUM, 16, 16, 3)
        np.testing.assert_array_equal(data["labels"], run.labels)
        np.testing.assert_array_equal(data["images"], run.images)
    assert run.images.std() > 0  # not a constant image that any sampler would reproduce


def test_sample_export_command_writes_grid_and_npz(run, fresh_process):
    with np.load(fresh_process / "cli.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], run.images[:3])  # same seed and batch
        np.testing.assert_array_equal(data["arr_1"], [0, 1, 2])
    with Image.open(fresh_process / "grid.png") as png:
        # 3 images tile 2x2 cells of 16 px + 2 px padding (38 px), upscaled 13x (512 // 38).
        assert png.format == "PNG" and png.size == (13 * 38, 13 * 38)


def test_pipeline_validates_arguments_before_compiling(run):
    pipeline = Pipeline.load(str(run.bf16))
    assert pipeline.step == STEP and pipeline.num_classes == 6
    assert pipeline.image_size == 16
    for kwargs, message in (
            (dict(num=0), "num must be a positive int"),
            (dict(num=4, sampler="euler"), "Unknown sampler 'euler'"),
            (dict(num=4, steps="ddim7x"), "ddim7x"),
            (dict(num=4, batch_size=12), "batch_size=12 must be a positive multiple of the 8"),
            (dict(num=4, labels=[1, 2]), "labels must be one int or 4 ints"),
            (dict(num=2, labels=[1, 6]), r"labels\[1\]=6 is outside \[0, 6\)")):
        with pytest.raises(ValueError, match=message):
            pipeline.sample(**kwargs)
    assert not pipeline._sample_fns
    with pytest.raises(ValueError, match="no 'raw' parameters"):
        Pipeline.load(str(run.bf16), raw=True)


#### Refusals: tensors not matching the config, corrupted files, unsafe writes ####


@pytest.fixture
def copy(run, tmp_path):
    """A writable copy of the bf16 export and the path of its expert-0 file."""
    target = tmp_path / "copy"
    shutil.copytree(run.bf16, target)
    return target, target / f"{EXPERTS[0]}.ema.safetensors"


def _rewrite(path, edit):
    tensors = safetensors.numpy.load_file(str(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(path))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"out_conv/kernel": t["out_conv/kernel"][..., :2]}),
     r"tensor 'out_conv/kernel' has shape \(3, 3, 32, 2\), the config's U-Net expects "
     r"\(3, 3, 32, 12\)"),
    (lambda t: t.pop("input_conv/bias"), r"missing tensor 'input_conv/bias'"),
    (lambda t: t.update({"bogus/kernel": np.zeros(3, np.float32)}),
     r"unexpected tensor 'bogus/kernel'"),
], ids=["wrong_shape", "missing_key", "extra_key"])
def test_load_refuses_tensors_not_matching_the_config(copy, edit, message):
    export_dir, path = copy
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=rf"{EXPERTS[0]}\.ema\.safetensors: {message}"):
        Pipeline.load(str(export_dir))


def test_load_refuses_truncated_and_corrupted_files_naming_them(copy):
    export_dir, path = copy
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf"{EXPERTS[0]}\.ema\.safetensors is not a readable "
                                         r"safetensors file \(corrupted or truncated\?\)"):
        Pipeline.load(str(export_dir))
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # inside the last tensor: the header still parses
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=rf"{EXPERTS[0]}\.ema\.safetensors is corrupted: "
                                         r"its sha256"):
        Pipeline.load(str(export_dir))
    (export_dir / "model.json").write_text("{")
    with pytest.raises(ValueError, match=r"model\.json is not valid JSON"):
        Pipeline.load(str(export_dir))
    with pytest.raises(FileNotFoundError, match="is not a pdm_jax export"):
        Pipeline.load(str(export_dir / "nowhere"))


def test_export_refuses_bad_dtype_and_non_export_targets(run, tmp_path):
    config = run.config.copy_and_resolve_references()
    config.export.update(dtype="float16", dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match=r"Unknown export.dtype 'float16'; expected one of "
                                         r"\('float32', 'bfloat16'\)"):
        export.run(config, str(run.workdir))
    config.export.update(dtype="float32", dir="gs://bucket/x")
    with pytest.raises(ValueError, match="exports are written to local paths"):
        export.run(config, str(run.workdir))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    meta, config, params = export_format.read_export(str(run.bf16))
    with pytest.raises(FileExistsError, match="is not a pdm_jax export; refusing"):
        export_format.write_export(str(tmp_path / "busy"), config, [{"ema": p} for p in params],
                                   [STEP] * 2, dtype="float32", source={})
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # no temporary directory left behind
