"""Reverse process (SPEC 5): golden p_mean_variance, closed-form sampling with the exact denoiser,
classifier-free guidance, thresholding, and the jitted single-scan loop.

Closed-form set-up: every pixel is an independent draw of a 1-D data distribution (Gaussian
N(mu, s^2) or two points), and the model is the exact posterior mean E[x0 | x_t] in the x0
parameterisation, so the samplers' output distribution is known.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.diffusion import losses, samplers
from pdm_jax.diffusion.schedules import Schedule

FULL = Schedule.from_name("linear")


def key(seed):
    # 'rbg' keys: on CPU, XLA spends seconds compiling each threefry hash in a sampling program
    # and far less on RngBitGenerator. sample_loop takes any key type; the traced-once test
    # runs with the default threefry key.
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def golden(golden_dir):
    return np.load(golden_dir / "pdm_diffusion_reference.npz")


@pytest.mark.parametrize("name", ["linear", "linear0.025", "cosine"])
@pytest.mark.parametrize("param", losses.PARAMETERIZATIONS)
@pytest.mark.parametrize("spacing", ["1000", "250"])
def test_p_mean_variance_matches_golden(golden, name, param, spacing):
    schedule = Schedule.from_name(name).respace(spacing)
    prefix = f"p_mean_variance/{name}/{param}/{spacing}/"
    index = jnp.asarray(golden[prefix + "respaced_index"])
    assert int(index[-1]) == schedule.num_steps - 1
    out = samplers.p_mean_variance(
        schedule, index, golden[f"q_sample/{name}/x_t_nhwc"], golden["model_mean_out_nhwc"],
        golden["model_var_out_nhwc"], param,
    )
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        np.testing.assert_allclose(
            np.asarray(out[key]), golden[prefix + key + "_nhwc"], rtol=1e-5, atol=0, err_msg=key
        )


# ---------------------------------------------------------------- exact denoisers (x0 output)

def _abar(t):
    return jnp.asarray(FULL.alphas_cumprod, jnp.float32)[t][:, None, None, None]


def gaussian_denoiser(x, t, mu, s):
    """E[x0 | x_t] for x0 ~ N(mu, s^2): mu + k (x_t - sqrt(abar) mu)."""
    a = _abar(t)
    k = jnp.sqrt(a) * s**2 / (a * s**2 + 1 - a)
    return mu + k * (x - jnp.sqrt(a) * mu)


def two_point_denoiser(x, t, a_pt, p):
    """E[x0 | x_t] for x0 = +a w.p. p, -a w.p. 1-p."""
    a = _abar(t)
    logit = np.log(p / (1 - p)) + 2 * a_pt * jnp.sqrt(a) * x / (1 - a)
    return a_pt * jnp.tanh(logit / 2)


def exact_reverse_v(schedule, s):
    """v in [0, 1] that makes the learned variance equal the true reverse variance.

    For Gaussian data p(x_{i-1} | x_i) is Gaussian with variance
    beta_tilde'_i + coef1_i^2 Var[x0 | x_i]; v solves
    v log beta_tilde' + (1 - v) log beta' = log of that variance.
    Returns a table over ORIGINAL t (the model sees original t).
    """
    ab = schedule.alphas_cumprod
    var_x0 = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
    true_var = schedule.posterior_variance + schedule.posterior_mean_coef1**2 * var_x0
    lo, hi = schedule.posterior_log_variance_clipped, np.log(schedule.betas)
    v = (np.log(true_var) - hi) / (lo - hi)
    v[0] = 0.5  # no noise is added at index 0
    table = np.zeros(FULL.num_steps)
    table[schedule.timesteps] = v
    return v, table


def test_ddpm_with_exact_learned_variance_reproduces_gaussian_data():
    """With the true reverse Gaussian at each of 50 steps, DDPM is exact: only Monte-Carlo error."""
    mu, s = 0.2, 0.15  # inside [-1, 1] by > 5 s, so the x0 clipping never acts
    schedule = FULL.respace("50")
    v, v_table = exact_reverse_v(schedule, s)
    # Analytic-DPM: the optimal variance lies between beta_tilde and beta when Var[x0] <= 1.
    assert (v[1:] >= 0).all() and (v[1:] <= 1).all()
    v_table = jnp.asarray(v_table, jnp.float32)

    def model_fn(x, t, y):
        v_out = jnp.broadcast_to(v_table[t][:, None, None, None], x.shape)
        return gaussian_denoiser(x, t, mu, s), v_out

    shape = (64, 32, 32, 2)  # 131,072 iid pixels
    x = jax.jit(functools.partial(samplers.sample_loop, model_fn, shape=shape, schedule=schedule))(
        key(0)
    )
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    # The last step returns E[x0 | x at t=0], which is slightly shrunk: Var = s^2 - Var[x0 | x_0].
    a0 = FULL.alphas_cumprod[0]
    target_std = s * np.sqrt(1 - (1 - a0) / (a0 * s**2 + 1 - a0))
    # 4-sigma Monte-Carlo bounds: std(mean) = s/sqrt(n), relative std(std) = 1/sqrt(2n).
    assert abs(x.mean() - mu) < 4 * s / np.sqrt(n)
    assert abs(x.std() / target_std - 1) < 4 / np.sqrt(2 * n)


def test_ddim_eta0_is_the_probability_flow_map_for_gaussian_data():
    """DDIM(eta=0) with the exact denoiser discretises the probability-flow ODE, which maps
    N(0, 1) to N(mu, s^2) by x0 = mu + s x_T. For Gaussian data every DDIM step is affine, so the
    output is exactly affine in x_T: we fit slope and intercept, free of Monte-Carlo error.
    Tolerance: the 1000-step discretisation bias is 0.3% on the slope (float64 recursion);
    the bound is 1%. Clipping is off because s = 0.5 data leaves [-1, 1]."""
    mu, s = 0.1, 0.5

    def model_fn(x, t, y):
        return gaussian_denoiser(x, t, mu, s), None

    x_T = jax.random.normal(key(1), (4, 16, 16, 4))
    run = functools.partial(
        samplers.sample_loop, model_fn, shape=x_T.shape, schedule=FULL.respace("1000"),
        sampler="ddim", eta=0.0, learn_sigma=False, clip_denoised=False,
    )
    x0 = np.asarray(jax.jit(run)(key(2), x_T=x_T), np.float64).ravel()
    xT = np.asarray(x_T, np.float64).ravel()
    slope, intercept = np.polyfit(xT, x0, 1)
    assert np.abs(x0 - (slope * xT + intercept)).max() < 1e-4  # deterministic and affine
    a0 = FULL.alphas_cumprod[0]
    target_std = s * np.sqrt(1 - (1 - a0) / (a0 * s**2 + 1 - a0))
    assert abs(slope / target_std - 1) < 0.01
    assert abs(intercept - mu) < 0.005


def test_ddpm_fixed_large_variance_matches_gaussian_data_on_full_chain():
    """learn_sigma=False, beta variance: on 1000 steps its bias is +0.15% on the std (float64
    recursion); 16,384 samples give a Monte-Carlo std error of 0.55%; bound 2.5%."""
    mu, s = 0.1, 0.5

    def model_fn(x, t, y):
        return gaussian_denoiser(x, t, mu, s), None

    shape = (16, 16, 16, 4)
    run = functools.partial(
        samplers.sample_loop, model_fn, shape=shape, schedule=FULL.respace("1000"),
        learn_sigma=False, clip_denoised=False, fixed_variance="large",
    )
    x = np.asarray(jax.jit(run)(key(3)), np.float64).ravel()
    assert abs(x.mean() - mu) < 4 * s / np.sqrt(x.size)
    assert abs(x.std() / s - 1) < 0.025


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_two_point_data_lands_on_the_points_with_the_right_mass(sampler):
    """x0 = +0.5 w.p. 0.3, -0.5 w.p. 0.7; 50 steps, default clipping, fixed small variance.
    The last step returns E[x0 | x_0] = +-0.5 to float precision. Mass on +0.5 from a float64
    simulation of the same samplers: DDIM 0.2976, DDPM 0.287 (the fixed variance's bias);
    Monte-Carlo std 0.0025 at 32,768 samples; bound |frac - 0.3| < 0.025."""
    a_pt, p = 0.5, 0.3

    def model_fn(x, t, y):
        return two_point_denoiser(x, t, a_pt, p), None

    shape = (32, 32, 32, 1)
    run = functools.partial(
        samplers.sample_loop, model_fn, shape=shape, schedule=FULL.respace("50"),
        sampler=sampler, learn_sigma=False, fixed_variance="small",
    )
    x = np.asarray(jax.jit(run)(key(4))).ravel()
    np.testing.assert_allclose(np.abs(x), a_pt, atol=1e-5)
    assert abs((x > 0).mean() - p) < 0.025


# ---------------------------------------------------------------- guidance

NULL = 7
MU, S = 0.2, 0.15


def labelled_model(record):
    """Gaussian denoiser shifted by 0.1 for a real label, 0 for the null label; the variance
    output also depends on the label, so taking it from the wrong half shows."""

    def model_fn(x, t, y):
        record.append(x.shape)
        real = (y != NULL).astype(jnp.float32)[:, None, None, None]
        var = jnp.broadcast_to(0.3 + 0.4 * real, x.shape)
        return gaussian_denoiser(x, t, MU, S) + 0.1 * real, var

    return model_fn


def test_guidance_scale_one_is_the_conditional_model():
    calls = []
    shape = (4, 8, 8, 3)
    labels = jnp.asarray([0, 1, 2, 3])
    common = dict(shape=shape, schedule=FULL.respace("20"), rng=key(5))
    cond_only = labelled_model([])
    out = samplers.sample_loop(
        labelled_model(calls), labels=labels, null_label=NULL, guidance_scale=1.0, **common
    )
    ref = samplers.sample_loop(lambda x, t, y: cond_only(x, t, labels), **common)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert calls == [shape]  # one B-sized call per step, traced once


def test_guided_sampling_is_one_2b_call_mixing_eps():
    """Guided sampling with w equals unguided sampling of a model that mixes eps by hand:
    eps = eps_u + w (eps_c - eps_u), variance of the conditional half. x0 stays inside [-1, 1]
    here, so dynamic thresholding (s = max(q, 1) = 1) and clipping agree."""
    w, calls = 2.0, []
    shape = (4, 8, 8, 3)
    labels = jnp.asarray([0, 1, 2, 3])
    base = labelled_model([])

    def mixed(x, t, y):
        x0_c, var_c = base(x, t, labels)
        x0_u, _ = base(x, t, jnp.full_like(labels, NULL))
        eps_c, eps_u = losses.eps_from_x0(FULL, x, t, x0_c), losses.eps_from_x0(FULL, x, t, x0_u)
        eps = eps_u + w * (eps_c - eps_u)  # SPEC 5, written out
        return losses.x0_from_eps(FULL, x, t, eps), var_c

    common = dict(shape=shape, schedule=FULL.respace("25"), rng=key(6))
    guided = samplers.sample_loop(
        labelled_model(calls), labels=labels, null_label=NULL, guidance_scale=w, **common
    )
    ref = samplers.sample_loop(mixed, **common)
    assert calls == [(2 * shape[0],) + shape[1:]]
    # `mixed` differs from the conditional model (x0 shift 0.2 instead of 0.1), so a sampler that
    # ignored the guidance, mixed x0 the wrong way round or took the wrong variance fails here.
    np.testing.assert_allclose(np.asarray(guided), np.asarray(ref), atol=1e-4)


def test_guided_eps_endpoints():
    c, u = jnp.ones(3), jnp.zeros(3)
    np.testing.assert_array_equal(samplers.guided_eps(c, u, 0.0), u)
    np.testing.assert_array_equal(samplers.guided_eps(c, u, 1.0), c)
    np.testing.assert_array_equal(samplers.guided_eps(c, u, 1.5), 1.5 * c)


# ---------------------------------------------------------------- thresholding and steps

def test_dynamic_threshold_on_known_array():
    # Sample 0: |x| = 0, 0.01, ..., 2.00 (201 values); the 99.5% quantile sits at position
    # 0.995 * 200 = 199, i.e. 1.99, so x -> clip(x, -1.99, 1.99) / 1.99.
    mags = np.arange(201) * 0.01
    big = mags * np.where(np.arange(201) % 2, 1.0, -1.0)
    # Sample 1: inside [-1, 1], so s = max(q, 1) = 1 and it is unchanged.
    small = np.linspace(-0.9, 0.9, 201)
    x = jnp.asarray(np.stack([big, small]).reshape(2, 201, 1, 1), jnp.float32)
    out = np.asarray(samplers.dynamic_threshold(x)).reshape(2, 201)
    np.testing.assert_allclose(out[0], np.clip(big, -1.99, 1.99) / 1.99, rtol=1e-6)
    assert np.abs(out[0]).max() == pytest.approx(1.0)
    np.testing.assert_allclose(out[1], small, rtol=1e-6)
    np.testing.assert_array_equal(samplers.clip_x0(jnp.asarray([-3.0, 0.5, 2.0])), [-1.0, 0.5, 1.0])


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    schedule = FULL.respace("100")
    rng = key(7)
    x = jax.random.normal(key(8), (3, 4, 4, 2))
    x0 = jnp.tanh(x) * 0.5
    index = jnp.asarray([0, 40, 99])
    out = samplers.p_mean_variance(schedule, index, x, x0, None, "x0", fixed_variance="small")
    eps = losses.eps_from_x0(schedule, x, index, x0)
    ddpm = samplers.ddpm_step(rng, schedule, index, x, out)
    ddim = samplers.ddim_step(rng, schedule, index, x, x0, eps, eta=1.0)
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ddpm[0]), np.asarray(x0[0]), atol=1e-6)  # no noise at 0


# ---------------------------------------------------------------- one scan, traced once

def test_sample_loop_is_one_scan_traced_once():
    calls = []
    model_fn = labelled_model(calls)
    shape = (2, 4, 4, 3)
    schedule = FULL.respace("50")
    run = jax.jit(
        lambda rng, y: samplers.sample_loop(
            model_fn, rng, shape, schedule, labels=y, null_label=NULL, guidance_scale=1.5,
            sampler="ddim", eta=0.5,
        )
    )
    y = jnp.asarray([1, 2])
    jaxpr = jax.make_jaxpr(run)(jax.random.PRNGKey(0), y)
    text = str(jaxpr)
    assert text.count("scan[") == 1 and "while[" not in text
    a = run(jax.random.PRNGKey(0), y)
    b = run(jax.random.PRNGKey(1), y)  # same shapes: no retrace
    # The model body was traced once for all 50 steps (by make_jaxpr; jit reused that trace).
    assert len(calls) == 1
    assert a.shape == shape and bool(jnp.all(jnp.isfinite(a))) and not np.allclose(a, b)


def test_bad_arguments_raise():
    model_fn = labelled_model([])
    kw = dict(shape=(1, 2, 2, 1), schedule=FULL.respace("10"), rng=key(0), labels=jnp.asarray([1]))
    with pytest.raises(ValueError, match="'euler'.*ddpm"):
        samplers.sample_loop(model_fn, sampler="euler", **kw)
    with pytest.raises(ValueError, match="'medium'.*small"):
        samplers.sample_loop(model_fn, fixed_variance="medium", **kw)
    with pytest.raises(ValueError, match="null_label"):
        samplers.sample_loop(model_fn, guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match="'eps2'.*x0"):
        samplers.sample_loop(model_fn, parameterization="eps2", **kw)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_every_parameterization_samples_like_x0_given_the_same_exact_model(parameterization,
                                                                           guidance_scale):
    """The exact two-point denoiser, re-expressed as an eps or v output at the original t, must
    give the x0 model's samples (same key, DDPM and guidance paths): catches a conversion or
    timestep-indexing slip that only the eps/v read-outs of a trained network would show."""
    a_pt, p, null = 0.5, 0.3, 3

    def model_fn(param):
        def fn(x, t, y):
            x0 = two_point_denoiser(x, t, a_pt, p)
            if param == "eps":
                return losses.eps_from_x0(FULL, x, t, x0), None
            if param == "v":
                return losses.v_from_x0(FULL, x, t, x0), None
            return x0, None
        return fn

    def run(param):
        fn = functools.partial(
            samplers.sample_loop, model_fn(param), shape=(16, 8, 8, 1),
            schedule=FULL.respace("50"), sampler="ddpm", learn_sigma=False,
            parameterization=param, labels=jnp.zeros((16,), jnp.int32), null_label=null,
            guidance_scale=guidance_scale)
        return np.asarray(jax.jit(fn)(key(5)))

    np.testing.assert_allclose(run(parameterization), run("x0"), atol=2e-4)


def test_grid_columns_give_each_class_a_column():
    from pdm_jax import sampling
    labels = sampling.balanced_labels(0, 40, 6)
    columns = sampling.grid_columns(40, 6)
    assert columns == 6 and all(labels[i] == i % columns for i in range(40))
    assert sampling.grid_columns(16, 8) == 8
    # Square grids where a column per class cannot work: unconditional, one class, fewer images
    # than classes, or too many classes for a readable row.
    assert [sampling.grid_columns(n, k) for n, k in [(16, 0), (16, 1), (4, 8), (64, 1000)]] == [
        None] * 4
