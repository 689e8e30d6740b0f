"""Each benchmark script runs once at its --smoke size and prints JSON, and only JSON, on stdout.

The scripts run in this process (runpy) so JAX and TensorFlow are imported once; each smoke size
is a micro U-Net (16 channels, one level, no attention) so compiles take seconds. Beyond the
documented keys, each test checks relations the script's numbers must satisfy (exact MAC and
parameter counts, the split of the chain, extrapolation arithmetic, grid geometry, denoising
error growing with the noise level and falling with training).
"""

import json
import math
import os
import pathlib
import runpy
import shutil
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, capsys, *args: str) -> tuple[dict, str]:
    """Runs benchmarks/<name> --smoke ARGS; returns (its stdout parsed as JSON, its stderr).

    json.loads of the WHOLE stdout: anything else printed there (e.g. tfds' "Downloading and
    preparing dataset ..." on first use) fails the test."""
    argv = sys.argv
    sys.argv = [name, "--smoke", *args]
    try:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def run_failing(argv: list[str], error: type[Exception], match: str) -> None:
    saved = sys.argv
    try:
        sys.argv = argv
        with pytest.raises(error, match=match):
            runpy.run_path(str(BENCHMARKS / argv[0]), run_name="__main__")
    finally:
        sys.argv = saved


#### model_cost.py ####


def micro_unet(patch: int, image_size: int):
    """model_cost.py's 'micro' preset at P@R (no attention level exists at these sizes)."""
    from pdm_jax.models.unet import UNetConfig

    return UNetConfig(image_size=image_size, patch_size=patch, model_channels=16,
                      channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                      num_head_channels=16, num_groups=8, num_classes=4)


def test_model_cost(capsys):
    from pdm_jax.models.unet import count_params

    out, _ = run_script("model_cost.py", capsys, "--chip=H100", "--specs=2@8,1@4,4@16")
    assert out["peak_tflops"] == 989.0
    by_spec = {(r["patch_size"], r["image_size"]): r for r in out["results"]}
    assert list(by_spec) == [(2, 8), (1, 4), (4, 16)]
    for (p, res), r in by_spec.items():
        for key in ("params", "gmacs_per_forward_per_image", "xla_gflops_per_forward",
                    "xla_gflops_per_train_step", "analytic_tflops_per_train_step",
                    "peak_memory_gib", "forward_ms", "train_step_ms", "train_images_per_s",
                    "mfu_train", "mfu_forward"):
            assert key in r, key
        assert r["batch"] == 2 and r["patched_size"] == 4
        # The parameters of the model it timed are those of the same architecture counted
        # abstractly by the library.
        assert r["params"] == count_params(micro_unet(p, res))
        # The derived columns follow from MACs, batch, step time and the H100 peak.
        macs = r["gmacs_per_forward_per_image"] * 1e9
        step_s = r["train_step_ms"] / 1e3
        assert r["analytic_tflops_per_train_step"] == pytest.approx(6 * macs * 2 / 1e12)
        assert r["train_images_per_s"] == pytest.approx(2 / step_s)
        assert r["mfu_train"] == pytest.approx(6 * macs * 2 / step_s / 989e12)
        assert r["mfu_forward"] == pytest.approx(2 * macs * 2 / (r["forward_ms"] / 1e3) / 989e12)

    # Same U-Net body on the same 4x4 grid: P@(4P) and 1@4 differ only in the stem conv
    # (3x3, 3P^2 -> 16 channels) and the head conv (3x3, 16 -> 6P^2: x0 and the variance),
    # i.e. by 16 positions * 9 * 16 * (3 + 6) * (P^2 - 1) MACs and 9 * 16 * 9 * (P^2 - 1)
    # weights + 6 (P^2 - 1) head biases.
    base = by_spec[(1, 4)]
    for p in (2, 4):
        r = by_spec[(p, 4 * p)]
        extra_macs = (r["gmacs_per_forward_per_image"] - base["gmacs_per_forward_per_image"]) * 1e9
        assert extra_macs == pytest.approx(16 * 9 * 16 * 9 * (p * p - 1), abs=0.5)
        assert r["params"] - base["params"] == 9 * 16 * 9 * (p * p - 1) + 6 * (p * p - 1)

    comps = {(c["a"], c["b"], c["kind"]): c for c in out["comparisons"]}
    assert set(comps) == {("2@8", "1@4", "same patched size"), ("4@16", "1@4", "same patched size")}
    for (a, b, _), c in comps.items():
        ra, rb = (by_spec[tuple(int(v) for v in s.split("@"))] for s in (a, b))
        for key in ("gmacs_per_forward_per_image", "train_step_ms", "params"):
            assert c[f"{key}_ratio_a_over_b"] == pytest.approx(ra[key] / rb[key])


def test_bad_arguments_fail_fast():
    run_failing(["model_cost.py", "--specs=3@64"], ValueError, "3@64")
    run_failing(["objective_study.py", "--parameterizations=x0,score"], ValueError, "score")
    run_failing(["objective_study.py", "--eval_t=100,1000"], ValueError, "1000")
    run_failing(["sampling_throughput.py", "--variants=patched,nope"], ValueError, "nope")
    run_failing(["sampling_throughput.py", "--time_steps=1"], ValueError, "time_steps=1")


#### sampling_throughput.py ####


def test_sampling_throughput(capsys):
    out, _ = run_script("sampling_throughput.py", capsys)
    assert out["batch"] == 2 and out["image_size"] == 16
    assert out["extrapolated"] == "2 timed steps per expert -> 250 steps"
    (r,) = out["results"]
    assert r["variant"] == "patched" and r["steps"] == 250
    experts = r["experts"]
    # configs/imagenet256.py: the SNR-0.25 split gives 99 low-noise and 151 high-noise steps.
    assert [e["chain_steps"] for e in experts] == [99, 151]
    assert [e["snr_interval"] for e in experts] == [[0.25, math.inf], [0.0, 0.25]]
    assert [e["patch_size"] for e in experts] == [4, 4]  # recipe=paper
    assert [e["timed_steps"] for e in experts] == [2, 2]
    assert all(e["step_ms"] > 0 for e in experts)
    # The extrapolation: t_250 = sum_e steps_e * (time per step of expert e).
    total = sum(e["chain_steps"] * e["step_ms"] / 1e3 for e in experts)
    assert r["seconds_per_batch_extrapolated"] == pytest.approx(total, rel=1e-12)
    assert r["images_per_s"] * r["seconds_per_batch_extrapolated"] == pytest.approx(2.0)


#### objective_study.py ####


def test_objective_study(capsys, tmp_path):
    """With an empty --data_dir tfds builds the demo set first, printing "Downloading and
    preparing dataset ..." (the CI failure when that reached stdout before the JSON)."""
    out, err = run_script("objective_study.py", capsys, f"--data_dir={tmp_path}")
    assert "Downloading and preparing dataset" in err  # the first-use path did run
    assert out["steps"] == 2 and out["eval_t"] == [100, 800] and out["eval_images"] == 8
    (r,) = out["results"]
    assert (r["patch_size"], r["parameterization"]) == (4, "v")
    assert np.isfinite(r["final_train_loss"]) and r["train_s"] > 0
    for key in ("x0_mse", "x0_mse_init"):
        mse = r[key]
        assert set(mse) == {"100", "800"}
        assert all(np.isfinite(v) and v > 0 for v in mse.values()), mse
        # Denoising gets harder with the noise level: at t=800 (alpha_bar ~ 0.002) the input
        # has nearly no signal left; at t=100 (alpha_bar ~ 0.9) most of it.
        assert mse["100"] < mse["800"], mse
    # Two steps moved the EMA weights (decay 0.99) a little, downhill: the scored weights are
    # the trained ones, and better than the initial ones at both t.
    for t in ("100", "800"):
        assert r["x0_mse"][t] < r["x0_mse_init"][t], r


#### demo_recipe_sweep.py ####


def test_demo_recipe_sweep(capsys, tmp_path):
    from PIL import Image

    out, _ = run_script("demo_recipe_sweep.py", capsys, "--recipes=x0_b16_lr2e3",
                        f"--out={tmp_path}")
    assert out["failed"] == []
    (r,) = out["results"]
    assert r["recipe"] == "x0_b16_lr2e3" and r["steps"] == 4 and r["batch_size"] == 16
    assert r["overrides"]["optim"] == {"lr": 2e-3, "warmup_steps": 100} and r["device"] == "cpu"
    # Compiling is part of the wall time; the timed steps are the 3 after the first.
    assert r["wall_s"] >= r["compile_s"] > 0 and r["train_steps_per_s"] > 0
    assert r["loss"] == []  # loss is logged every 25 steps; the smoke run has 4
    assert sorted(r["grids"]) == ["2", "4"]
    # Each snapshot is a 4x4 grid of 16x16 samples with 2 white pixels around each one.
    side = 4 * (16 + 2) + 2
    for path in r["grids"].values():
        grid = np.asarray(Image.open(path).convert("RGB"))
        assert grid.shape == (side, side, 3)
        assert (grid[:2] == 255).all() and (grid[:, 18:20] == 255).all()
        tile = grid[2:18, 2:18]
        assert (tile != 255).any()  # a sample (near-untrained: x0 ~ 0, grey), not the padding
    # The contact sheet: a 110-px label column and 14-px header, each grid in a 4-px margin.
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.size == (110 + 2 * (side + 4), 14 + (side + 4))


def test_demo_recipe_sweep_rejects_an_unknown_recipe():
    run_failing(["demo_recipe_sweep.py", "--smoke", "--recipes=demo,nope"], ValueError, "nope")


#### demo_fid.py ####


def run_demo_fid(capsys, *args: str) -> dict:
    argv = sys.argv
    sys.argv = ["demo_fid.py", *args]
    try:
        runpy.run_path(str(BENCHMARKS / "demo_fid.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return json.loads(capsys.readouterr().out)


def test_demo_fid_scores_a_run_next_to_its_datas_floor(capsys, tmp_path):
    """A workdir of random (untrained) demo-smoke weights, random Inception weights, 8 samples:
    the JSON has both sets of metrics at the same count, and noise is farther from the data
    than the data's other half is. A float32 export of that run scores exactly the same."""
    from conftest import demo_config, write_random_run
    from test_fid_metrics import random_inception_weights

    import jax

    from pdm_jax import export_format
    from pdm_jax.data import datasets
    from pdm_jax.diffusion.experts import experts_from_config
    from pdm_jax.evaluation import inception

    config = demo_config("smoke")  # the demo images at 16x16, two experts
    states = write_random_run(tmp_path / "run", config, step=2)
    weights = str(tmp_path / "inception.safetensors")
    inception.save_inception_weights(weights, random_inception_weights(), source="random")
    common = (f"--inception_path={weights}", "--num=8", "--batch_size=8")
    out = run_demo_fid(capsys, f"--workdir={tmp_path / 'run'}", *common)
    # Every image of the demo set is distinct: the whole set was read, once.
    assert out["data_images"] == datasets.dataset_size(config.data)
    assert out["num"] == 8 and out["steps"] == "5"
    assert set(out["floor"]) == set(out["model"]) == {"fid", "sfid", "precision", "recall"}
    assert 0 < out["floor"]["fid"] < out["model"]["fid"]
    assert out["fid_over_floor"] == pytest.approx(out["model"]["fid"] / out["floor"]["fid"])

    export_format.write_export(
        str(tmp_path / "export"), config,
        [{"ema": jax.device_get(states[e.name]["ema"])} for e in experts_from_config(config)],
        [2] * len(states), dtype="float32", source={"workdir": str(tmp_path / "run")})
    from_export = run_demo_fid(capsys, f"--export_dir={tmp_path / 'export'}", *common)
    assert from_export["export_dir"] == str(tmp_path / "export")
    assert from_export["floor"] == out["floor"] and from_export["model"] == out["model"]


#### vs_pytorch.py ####


def test_vs_pytorch_refuses_a_folder_without_the_authors_code(tmp_path, capsys):
    argv = sys.argv
    sys.argv = ["vs_pytorch.py", f"--torch_repo={tmp_path}"]
    try:
        with pytest.raises(SystemExit):
            runpy.run_path(str(BENCHMARKS / "vs_pytorch.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert f"--torch_repo='{tmp_path}' holds no patch_diffusion/unet.py" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("PDM_TORCH_REPO"),
                    reason="set PDM_TORCH_REPO to a clone of the authors' PatchDiffusion-Pytorch")
def test_vs_pytorch_times_the_same_network_in_both(capsys):
    """The demo U-Net in both frameworks: same outputs, both timed, ratios consistent."""
    argv = sys.argv
    sys.argv = ["vs_pytorch.py", f"--torch_repo={os.environ['PDM_TORCH_REPO']}", "--archs=demo",
                "--demo_batch=2", "--iters=1"]
    try:
        runpy.run_path(str(BENCHMARKS / "vs_pytorch.py"), run_name="__main__")
    finally:
        sys.argv = argv
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["max_abs_output_diff"] < 1e-4 * max(result["output_scale"], 1.0)
    secs = result["seconds"]
    assert result["jax_over_torch"]["forward_backward"] == pytest.approx(
        secs["jax_forward_backward"] / secs["torch_forward_backward"])


def test_vs_pytorch_peer_runs_pdm_jax_in_another_python(golden_dir, tmp_path):
    """--jax_python's peer (here this interpreter again) imports the authors' weights, answers
    with their network's output and times its own calls."""
    import jax
    from conftest import golden_torch_state

    peer_class = runpy.run_path(str(BENCHMARKS / "vs_pytorch.py"))["_JaxPeer"]
    data = np.load(golden_dir / "pdm_unet_tiny_p4_classcond.npz")
    args = json.loads(str(data["config_json"]))
    peer = peer_class(sys.executable)
    try:
        assert peer.info["jax"] == jax.__version__
        out, calls = peer.load(args, golden_torch_state(data), data["input_x_nhwc"],
                               data["input_t"], data["input_y"], str(tmp_path))
        seconds = [calls["jax_forward"](), calls["jax_forward_backward"]()]
    finally:
        peer.close()
    assert out.shape == data["output_nhwc"].shape
    assert np.abs(out[..., :3] - data["output_nhwc"][..., :3]).max() <= 1e-4
    assert all(isinstance(s, float) and s > 0 for s in seconds)


def test_vs_pytorch_times_no_host_to_device_copy(golden_dir):
    """pdm_jax's timed calls move no data: the imported weights already live on the device (they
    were once numpy arrays, copied by every call: ~0.2 s of each LSUN forward)."""
    from conftest import golden_torch_state

    jax_side = runpy.run_path(str(BENCHMARKS / "vs_pytorch.py"))["_jax_side"]
    data = np.load(golden_dir / "pdm_unet_tiny_p4_classcond.npz")
    out, calls = jax_side(json.loads(str(data["config_json"])), golden_torch_state(data),
                          data["input_x_nhwc"], data["input_t"], data["input_y"])
    assert np.abs(out[..., :3] - data["output_nhwc"][..., :3]).max() <= 1e-4
    calls["jax_forward"]()  # under jax.transfer_guard("disallow"): a copy would raise
    calls["jax_forward_backward"]()


def test_vs_pytorch_peer_that_exits_is_reported():
    peer_class = runpy.run_path(str(BENCHMARKS / "vs_pytorch.py"))["_JaxPeer"]
    with pytest.raises(RuntimeError, match=r"the pdm_jax process under .*false exited \(code 1\)"):
        peer_class(shutil.which("false"))


#### gpu_issue18.sh ####


def test_gpu_script_runs_its_steps_at_smoke_size():
    """The prepared one-call GPU script (issue 18) runs end to end: a train-step cost per batch
    size, then the two-expert sampling throughput (SMOKE=1: micro networks, this backend)."""
    import subprocess

    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_issue18.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    decoder, text, docs = json.JSONDecoder(), done.stdout.strip(), []
    while text:
        doc, end = decoder.raw_decode(text)
        docs.append(doc)
        text = text[end:].strip()
    costs, sampling = docs[:-1], docs[-1]
    assert [c["results"][0]["batch"] for c in costs] == [2, 4]
    assert all(c["results"][0]["train_step_ms"] > 0 for c in costs)
    assert [c["results"][0]["patch_size"] for c in costs] == [4, 4]
    assert sampling["results"][0]["variant"] == "project"
    assert sampling["results"][0]["images_per_s"] > 0
