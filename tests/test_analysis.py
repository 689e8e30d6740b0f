"""The optimal denoiser E[x | z_t] of an empirical distribution, the patch-blur measure and
``--mode=analyze`` end to end.

The reference is a brute-force float64 numpy softmax over the whole data set; the JAX version
streams over data chunks in float32, so agreement is to float32 round-off.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, demo_config
from pdm_jax import config_validation
from pdm_jax.analysis import blur
from pdm_jax.analysis.optimal_denoiser import blur_rmse, optimal_denoiser, patch_blur
from pdm_jax.diffusion.schedules import Schedule

SCHEDULE = Schedule.from_name("linear")


def brute_force(data: np.ndarray, z: np.ndarray, abar: float) -> np.ndarray:
    """E[x | z] in float64: softmax_i log N(z; sqrt(abar) x_i, (1 - abar) I) over all data."""
    x = data.reshape(len(data), -1).astype(np.float64)
    zf = z.reshape(len(z), -1).astype(np.float64)
    sq = ((zf[:, None, :] - np.sqrt(abar) * x[None]) ** 2).sum(-1)  # (B, N)
    logits = -sq / (2.0 * (1.0 - abar))
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return (w @ x).reshape(z.shape)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 1, (13, 4, 4, 3)).astype(np.float32)
    queries = data[[0, 5, 12]]
    noise = rng.standard_normal(queries.shape).astype(np.float32)
    return data, queries, noise


def noisy(queries, noise, abar):
    return (np.sqrt(abar) * queries + np.sqrt(1 - abar) * noise).astype(np.float32)


@pytest.mark.parametrize("t", [150, 300, 400, 500, 700])
def test_matches_float64_brute_force(tiny, t):
    data, queries, noise = tiny
    abar = float(SCHEDULE.alphas_cumprod[t])
    z = noisy(queries, noise, abar)
    expected = brute_force(data, z, abar)
    got = np.asarray(optimal_denoiser(data, z, abar, chunk_size=4))
    # The posterior is neither one-hot nor uniform at these t: a real test of the weights.
    assert np.abs(expected - data[[0, 5, 12]]).max() > 1e-3 or t <= 150
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_chunked_equals_unchunked(tiny):
    data, queries, noise = tiny
    abar = float(SCHEDULE.alphas_cumprod[450])
    z = noisy(queries, noise, abar)
    whole = np.asarray(optimal_denoiser(data, z, abar, chunk_size=len(data)))
    for chunk in (1, 5, 13, 100):  # 5 pads 13 to 15: the padded rows must weigh nothing
        np.testing.assert_allclose(np.asarray(optimal_denoiser(data, z, abar, chunk)), whole,
                                   atol=1e-6, rtol=1e-6)


def test_extreme_t_stay_finite_and_correct(tiny):
    data, queries, noise = tiny
    near_clean = float(SCHEDULE.alphas_cumprod[0])  # 1 - 1e-4: logits ~ 1e5, one-hot posterior
    out = np.asarray(optimal_denoiser(data, noisy(queries, noise, near_clean), near_clean, 4))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, queries, atol=1e-5)
    last = float(SCHEDULE.alphas_cumprod[-1])  # 4e-5: near pure noise, weights nearly uniform
    z = noisy(queries, noise, last)
    out = np.asarray(optimal_denoiser(data, z, last, 4))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, brute_force(data, z, last), atol=2e-5)
    out = np.asarray(optimal_denoiser(data, noisy(queries, noise, 1e-12), 1e-12, 4))
    np.testing.assert_allclose(out, np.broadcast_to(data.mean(0), out.shape), atol=1e-4)
    with pytest.raises(ValueError, match="abar must lie in"):
        optimal_denoiser(data, queries, 1.0)
    with pytest.raises(ValueError, match="differ in the shape"):
        optimal_denoiser(data, queries[:, :2], 0.5)


def test_patch_blur_is_block_mean():
    x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    blurred = np.asarray(patch_blur(x, 2))
    np.testing.assert_allclose(blurred[0, :2, :2, 0], x[0, :2, :2, 0].mean())
    np.testing.assert_allclose(blurred[1, 2:, :2, 0], x[1, 2:, :2, 0].mean())
    assert float(blur_rmse(x, 1)) == 0.0
    with pytest.raises(ValueError, match="patch_size=3"):
        patch_blur(x, 3)


def test_blur_measure_zero_at_p1_and_grows_with_p_at_high_snr():
    rng = np.random.default_rng(1)
    data = rng.uniform(-1, 1, (24, 16, 16, 3)).astype(np.float32)
    queries, abar = data[:6], float(SCHEDULE.alphas_cumprod[20])  # SNR ~ 300
    z = noisy(queries, rng.standard_normal(queries.shape).astype(np.float32), abar)
    table = blur.blur_table(data, queries, SCHEDULE, [20, 999], [1, 2, 4, 8], 8, seed=0)
    high, low = table["rows"]
    assert high["relative_blur"]["1"] == 0.0
    rmse = [high["denoiser_blur_rmse"][str(p)] for p in (2, 4, 8)]
    assert rmse[0] < rmse[1] < rmse[2], rmse
    assert high["relative_blur"]["4"] == pytest.approx(1.0, abs=0.02)  # E[x|z] = the query
    # At pure noise E[x|z] is the data mean: far less patch detail than any one image.
    assert low["relative_blur"]["4"] < 0.5 * high["relative_blur"]["4"]
    assert np.isfinite(np.asarray(optimal_denoiser(data, z, abar, 8))).all()


def test_timesteps_and_validation():
    c = demo_config("smoke")  # data.image_size = 16
    c.analysis.num_timesteps = 5
    assert blur.analysis_timesteps(c.analysis, 1000) == [0, 250, 500, 749, 999]
    c.analysis.timesteps = (999, 0, 999)
    assert blur.analysis_timesteps(c.analysis, 1000) == [0, 999]
    assert blur.split_timestep(SCHEDULE) == 396
    config_validation.validate(c, "analyze")
    c.analysis.patch_sizes = (2, 3)
    with pytest.raises(ValueError, match="patch_sizes has 3"):
        config_validation.validate(c, "analyze")
    c.analysis.patch_sizes = (2,)
    c.analysis.timesteps = (1000,)
    with pytest.raises(ValueError, match=r"\[1000\] outside"):
        config_validation.validate(c, "analyze")


def test_mode_analyze_end_to_end(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(10):  # smooth 16x16 images: gradients plus a little noise
        ramp = np.linspace(0, 255, 16)[None, :, None] * rng.uniform(0.2, 1, (1, 1, 3))
        image = np.clip(ramp + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    workdir = tmp_path / "work"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    # The demo config is class-conditional and the folder has no labels: the analysis reads
    # images only, so it must not be refused for that.
    cmd = [sys.executable, "-m", "pdm_jax.main", "--config=configs/demo.py:smoke",
           f"--workdir={workdir}", "--mode=analyze", "--config.data.name=folder",
           f"--config.data.folder={folder}", "--config.analysis.num_data=32",
           "--config.analysis.num_queries=4", "--config.analysis.num_timesteps=4",
           "--config.analysis.chunk_size=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((workdir / "analysis" / "optimal_denoiser_blur.json").read_text())
    # 10 distinct images though 32 + 4 were asked for; 4 are held out as queries.
    assert (result["num_data"], result["num_queries"], result["held_out_queries"]) == (6, 4, True)
    assert result["split_t"] == 396 and result["patch_sizes"] == [2, 4, 8]
    assert [r["t"] for r in result["rows"]] == [0, 333, 666, 999]
    first, last = result["rows"][0], result["rows"][-1]
    # t=0: E[x|z] is the nearest data image, as detailed as the (similar) query images.
    assert first["relative_blur"]["2"] == pytest.approx(1.0, abs=0.3)
    assert last["relative_blur"]["8"] < first["relative_blur"]["8"]
    png = (workdir / "analysis" / "optimal_denoiser_blur.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
