"""Each benchmark script runs once at its --smoke size and prints JSON with the documented keys.

The scripts run in this process (runpy) so JAX and TensorFlow are imported once; each smoke size
is a micro U-Net (16 channels, one level, no attention) so compiles take seconds.
"""

import json
import pathlib
import runpy
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, capsys, *args: str) -> dict:
    argv = sys.argv
    sys.argv = [name, "--smoke", *args]
    try:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    finally:
        sys.argv = argv
    return json.loads(capsys.readouterr().out)


def test_model_cost(capsys):
    out = run_script("model_cost.py", capsys, "--chip=H100")
    assert out["peak_tflops"] == 989.0
    assert [(r["patch_size"], r["image_size"]) for r in out["results"]] == [(2, 8), (1, 4)]
    for r in out["results"]:
        for key in ("params", "gmacs_per_forward_per_image", "xla_gflops_per_forward",
                    "xla_gflops_per_train_step", "analytic_tflops_per_train_step",
                    "peak_memory_gib", "forward_ms", "train_step_ms", "train_images_per_s",
                    "mfu_train", "mfu_forward"):
            assert key in r, key
        assert r["forward_ms"] > 0 and r["train_step_ms"] > 0 and r["params"] > 0
    (comp,) = out["comparisons"]
    assert (comp["a"], comp["b"], comp["kind"]) == ("2@8", "1@4", "same patched size")
    # Same U-Net body on the same 4x4 grid: MACs differ only in the (patch-sized) stem and head.
    assert 1.0 < comp["gmacs_per_forward_per_image_ratio_a_over_b"] < 1.6


def test_sampling_throughput(capsys):
    out = run_script("sampling_throughput.py", capsys)
    (r,) = out["results"]
    assert r["variant"] == "patched" and r["steps"] == 250
    assert [e["chain_steps"] for e in r["experts"]] == [99, 151]  # the SNR-0.25 split
    assert r["images_per_s"] > 0 and "extrapolated" in out


def test_objective_study(capsys):
    out = run_script("objective_study.py", capsys)
    (r,) = out["results"]
    assert (r["patch_size"], r["parameterization"]) == (4, "v")
    assert set(r["x0_mse"]) == {"100", "800"}
    assert all(v >= 0 for v in r["x0_mse"].values()) and r["train_s"] > 0


def test_bad_arguments_fail_fast():
    argv = sys.argv
    try:
        sys.argv = ["model_cost.py", "--specs=3@64"]
        with pytest.raises(ValueError, match="3@64"):
            runpy.run_path(str(BENCHMARKS / "model_cost.py"), run_name="__main__")
        sys.argv = ["objective_study.py", "--parameterizations=x0,score"]
        with pytest.raises(ValueError, match="score"):
            runpy.run_path(str(BENCHMARKS / "objective_study.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_demo_recipe_sweep(capsys, tmp_path):
    out = run_script("demo_recipe_sweep.py", capsys, "--recipes=x0_b16_lr2e3",
                     f"--out={tmp_path}")
    assert out["failed"] == []
    (r,) = out["results"]
    assert r["recipe"] == "x0_b16_lr2e3" and r["steps"] == 4 and r["batch_size"] == 16
    assert sorted(r["grids"]) == ["2", "4"] and all(pathlib.Path(p).exists()
                                                    for p in r["grids"].values())
    assert r["train_steps_per_s"] > 0 and (tmp_path / "contact_sheet.png").exists()


def test_demo_recipe_sweep_rejects_an_unknown_recipe():
    argv = sys.argv
    try:
        sys.argv = ["demo_recipe_sweep.py", "--smoke", "--recipes=demo,nope"]
        with pytest.raises(ValueError, match="nope"):
            runpy.run_path(str(BENCHMARKS / "demo_recipe_sweep.py"), run_name="__main__")
    finally:
        sys.argv = argv
