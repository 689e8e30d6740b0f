"""The absl entry point as a user runs it: ``python -m pdm_jax.main --config=... --mode=...``.

Each test starts one subprocess (about 10 s of imports); none of them compiles a train step.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from pdm_jax import sharding, train_state
from pdm_jax.experts import experts_from_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config(arg: str):
    """``configs/demo.py``'s get_config(arg), imported by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("configs_demo", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def run_main(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "pdm_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_summary_prints_the_table_and_writes_summary_json(tmp_path):
    result = run_main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}", "--mode=summary")
    assert result.returncode == 0, result.stderr[-3000:]
    header, rule, *rows = result.stdout.strip().splitlines()[-4:]
    assert header.split() == ["expert", "SNR", "interval", "P", "image", "params", "(M)",
                              "GMACs/fwd", "steps"]
    assert set(rule) == {"-"} and len(rows) == 2
    assert rows[0].split()[:5] == ["0", "(0.25,", "inf]", "2", "16"]
    assert rows[1].split()[:5] == ["1", "(0,", "0.25]", "4", "16"]

    # Strict JSON: the open upper SNR bound is null, never the non-standard Infinity.
    summary = json.loads((tmp_path / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert summary["sample_steps"] == "5"
    high_snr, low_snr = summary["experts"]
    assert high_snr["snr_interval"] == [0.25, None] and low_snr["snr_interval"] == [0, 0.25]
    assert [e["patch_size"] for e in summary["experts"]] == [2, 4]
    # Parameter counts agree with the train state's own abstract parameters.
    config = demo_config("smoke")
    mesh = sharding.make_mesh((-1, 1))
    for row, expert in zip(summary["experts"], experts_from_config(config)):
        abstract, _ = train_state.state_shardings(
            expert.model, train_state.make_optimizer(expert.optim), mesh)
        assert row["params"] == sum(x.size for x in jax.tree.leaves(abstract["params"]))
        assert row["image_size"] == 16 and row["warm_start"] is None
    # Patch 4 runs the U-Net body on a 4x4 grid instead of 8x8: several times fewer MACs
    # (0.017 vs 0.005 GMACs, rounded to 3 decimals).
    assert high_snr["gmacs_per_forward"] > 2 * low_snr["gmacs_per_forward"] > 0
    # The 5 respaced steps are t = 0, 250, 500, 749, 999; SNR > 0.25 means t <= 395.
    assert [high_snr["sampling_steps"], low_snr["sampling_steps"]] == [2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.model.patch_size=3", "patch_size=3 does not divide image_size=16"),
    ("--config.diffusion.schedule=bogus", "unknown beta schedule 'bogus'"),
    ("--config.train.fid_every=-1", "train.fid_every must be >= 0"),
    ("--config.train.fid_every=5", "config.eval.inception_path is empty"),
])
def test_bad_config_values_fail_with_a_clear_message_before_anything_runs(
        tmp_path, override, message):
    workdir = tmp_path / "run"
    result = run_main("--config=configs/demo.py:smoke", f"--workdir={workdir}", override)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    # Validation precedes everything else in train(): not even the workdir was created, so no
    # data was loaded and nothing compiled.
    assert not workdir.exists()


@pytest.mark.slow
def test_config_overrides_reach_the_run(tmp_path):
    """--config.train.batch_size=12 is what train() sees: it is recorded and then refused for
    not splitting over the 8 devices (before any data loading or compile)."""
    result = run_main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
                      "--config.train.batch_size=12", f"--config.data.data_dir={tmp_path}/tfds")
    assert result.returncode != 0
    assert "train.batch_size=12 is not divisible by the 8 devices" in result.stderr, \
        result.stderr[-3000:]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["batch_size"] == 12
    assert saved["data"]["data_dir"] == f"{tmp_path}/tfds"
    assert not (tmp_path / "checkpoints").exists()
