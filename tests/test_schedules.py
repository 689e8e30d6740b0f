"""Schedules, respacing and SNR intervals: SPEC 4.1, 4.5, 5 and 6, and the golden tables."""

import math

import jax
import numpy as np
import pytest

from pdm_jax.diffusion import schedules
from pdm_jax.diffusion.schedules import Schedule

NAMES = ("linear", "linear0.025", "cosine")


@pytest.fixture(scope="module")
def golden(golden_dir):
    return np.load(golden_dir / "pdm_diffusion_reference.npz")


@pytest.mark.parametrize("name", NAMES)
def test_betas_and_alphas_cumprod_match_golden(golden, name):
    s = Schedule.from_name(name)
    assert s.betas.dtype == np.float64 and s.num_steps == 1000
    np.testing.assert_allclose(s.betas, golden[f"schedule/{name}/betas"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        s.alphas_cumprod, golden[f"schedule/{name}/alphas_cumprod"], rtol=1e-12, atol=0
    )


def test_linear_endpoints_and_final_alpha_bar():
    betas = schedules.make_betas("linear")
    assert betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert schedules.make_betas("linear0.025")[-1] == pytest.approx(0.025, rel=1e-12)
    # SPEC 4.1: linear abar_999 = 4.04e-5 (three significant digits).
    assert float(f"{Schedule.from_name('linear').alphas_cumprod[-1]:.3g}") == 4.04e-5
    assert schedules.make_betas("cosine").max() <= 0.999


@pytest.mark.parametrize("name, first_t", [("linear", 396), ("linear0.025", 355), ("cosine", 702)])
def test_first_step_with_snr_at_most_a_quarter(name, first_t):
    snr = Schedule.from_name(name).snr
    assert np.all(np.diff(snr) < 0), "SNR must decrease strictly with t"
    assert snr[first_t] <= 0.25 < snr[first_t - 1]


def test_posterior_tables_closed_form():
    s = Schedule.from_name("linear")
    # beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t); beta_tilde_0 = 0 and its log is
    # clipped to log beta_tilde_1.
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == pytest.approx(np.log(s.posterior_variance[1]))
    t = 500
    expected = s.betas[t] * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t])
    assert s.posterior_variance[t] == pytest.approx(expected, rel=1e-12)
    # At t=0 the posterior mean is x0 itself (abar_{-1} = 1): coef1 = 1, coef2 = 0.
    assert s.posterior_mean_coef1[0] == pytest.approx(1.0) and s.posterior_mean_coef2[0] == 0.0


@pytest.mark.parametrize("spec", ["250", "ddim50", "90,60,60,20,20", "1000"])
def test_respacing_matches_golden(golden, spec):
    np.testing.assert_array_equal(
        schedules.respace_timesteps(spec, 1000), golden[f"respacing/{spec}"]
    )


def test_respacing_250_uses_fractional_stride():
    # Stride 999/249 = 4.012, rounded: 0, 4, 8, ..., 995, 999 with a few gaps of 5.
    kept = schedules.respace_timesteps("250", 1000)
    assert len(kept) == 250
    np.testing.assert_array_equal(kept[:4], [0, 4, 8, 12])
    np.testing.assert_array_equal(kept[-2:], [995, 999])
    np.testing.assert_array_equal(kept, np.round(np.arange(250) * (999 / 249)).astype(int))
    assert set(np.diff(kept)) == {4, 5}


def test_respaced_schedule_keeps_alpha_bar_and_original_t():
    full = Schedule.from_name("cosine")
    sub = full.respace("ddim50")
    np.testing.assert_array_equal(sub.timesteps, np.arange(0, 1000, 20))
    np.testing.assert_allclose(sub.alphas_cumprod, full.alphas_cumprod[sub.timesteps], rtol=1e-12)
    # beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}
    assert sub.betas[1] == pytest.approx(1 - full.alphas_cumprod[20] / full.alphas_cumprod[0])
    # Respacing a respaced chain composes the kept steps.
    np.testing.assert_array_equal(sub.respace("ddim25").timesteps, np.arange(0, 1000, 40))


@pytest.mark.parametrize(
    "spec, message",
    [("abc", "abc"), ("ddim0", "ddim0"), ("ddim999", "ddim999"), ("1001", "1001"),
     ("10,,2", "10,,2"), ("600,400", "600,400")],
)
def test_bad_respacing_raises(spec, message):
    with pytest.raises(ValueError, match=message.replace(",", ".")):
        schedules.respace_timesteps(spec, 1000)


@pytest.mark.parametrize("name", ["quadratic", "linearfoo", "linear2.5", ""])
def test_unknown_schedule_raises_with_name(name):
    with pytest.raises(ValueError, match=f"'{name}'.*cosine"):
        schedules.make_betas(name)


def test_snr_intervals_partition_linear_chain():
    s = Schedule.from_name("linear")
    assert schedules.timestep_range_for_snr_interval(s, 0.0, 0.25) == (396, 999)
    assert schedules.timestep_range_for_snr_interval(s, 0.25, math.inf) == (0, 395)
    owner = schedules.expert_index_for_steps(s, [(0.25, math.inf), (0.0, 0.25)])
    assert (owner[:396] == 0).all() and (owner[396:] == 1).all()


def test_snr_intervals_on_250_respaced_steps():
    s = Schedule.from_name("linear").respace("250")
    assert len(schedules.steps_in_snr_interval(s, 0.0, 0.25)) == 151
    assert len(schedules.steps_in_snr_interval(s, 0.25, math.inf)) == 99
    assert schedules.timestep_range_for_snr_interval(s, 0.25, math.inf) == (0, 393)


def test_snr_interval_errors():
    s = Schedule.from_name("linear")
    with pytest.raises(ValueError, match="holds no step"):
        schedules.timestep_range_for_snr_interval(s, 1e6, 1e7)
    with pytest.raises(ValueError, match="partition"):
        schedules.expert_index_for_steps(s, [(0.2, math.inf), (0.0, 0.25)])


def test_sample_timesteps_reaches_both_ends_and_stays_in_range():
    t = np.asarray(schedules.sample_timesteps(jax.random.PRNGKey(0), 20000))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999  # t = T-1 trained (SPEC 8)
    lo, hi = 396, 999
    t = np.asarray(schedules.sample_timesteps(jax.random.PRNGKey(1), 20000, lo, hi))
    assert t.min() == lo and t.max() == hi
    with pytest.raises(ValueError, match="t_min"):
        schedules.sample_timesteps(jax.random.PRNGKey(1), 4, 10, 5)
