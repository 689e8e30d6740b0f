"""Forward process, parameterisations and the hybrid training loss (SPEC sections 4.2-4.4).

All functions are pure and jittable. `t` is an int array (B,) of indices into the schedule's
tables (the original-chain step for a full chain, see schedules.py). Tables are float64 on the
host and gathered as float32; every loss computation runs in float32 whatever the model's
compute dtype (SPEC 7: bf16 compute, fp32 loss). The formulas and their order of operations follow
the reference (guided-diffusion / PatchDiffusion-Pytorch), which the golden tests pin to 1e-5.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax.diffusion.schedules import Schedule

PARAMETERIZATIONS = ("x0", "eps", "v")
WEIGHTINGS = ("sqrt_snr", "p2", "snr", "snr+1", "truncated_snr")


def extract(table: np.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Gathers table[t] as float32 with shape (B, 1, ..., 1) for broadcasting against NHWC.

    Args:
      table: float64 (N,) host table.
      t: int (B,) indices.
      ndim: rank of the array the result multiplies.

    Returns:
      float32 (B,) + (1,) * (ndim - 1).
    """
    values = jnp.asarray(np.asarray(table, dtype=np.float32))[t]
    return values.reshape(values.shape + (1,) * (ndim - 1))


def _f32(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.asarray(x, dtype=jnp.float32)


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; accepted: {PARAMETERIZATIONS}"
        )


def q_sample(
    schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
    """z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, a sample of q(z_t | x0).

    Args:
      schedule: the chain.
      x0: (B, H, W, C) clean images.
      t: int (B,) steps.
      noise: standard normal, same shape as x0.

    Returns:
      float32 z_t, same shape as x0.
    """
    x0, noise = _f32(x0), _f32(noise)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def x0_from_eps(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
    """x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def eps_from_x0(
    schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray
) -> jnp.ndarray:
    """eps = (x_t / sqrt(abar) - x0) / sqrt(1/abar - 1), the inverse of x0_from_eps."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
    )


def x0_from_v(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """x0 = sqrt(abar) z - sqrt(1 - abar) v, v = sqrt(abar) eps - sqrt(1 - abar) x0 (SPEC 4.2)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )


def v_from_x0(schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray) -> jnp.ndarray:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 with eps re-derived from (x_t, x0)."""
    eps = eps_from_x0(schedule, x_t, t, x0)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x0
    )


def predict_x0(
    schedule: Schedule,
    model_out: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    parameterization: str,
) -> jnp.ndarray:
    """Converts the mean part of a model output to an x0 prediction (SPEC 4.2).

    Args:
      schedule: the chain.
      model_out: the mean output, read as x0, eps or v.
      x_t: the network input z_t.
      t: int (B,) steps.
      parameterization: 'x0', 'eps' or 'v'.

    Returns:
      float32 x0_hat, same shape as x_t.
    """
    _check_parameterization(parameterization)
    model_out, x_t = _f32(model_out), _f32(x_t)
    if parameterization == "x0":
        return model_out
    if parameterization == "eps":
        return x0_from_eps(schedule, x_t, t, model_out)
    return x0_from_v(schedule, x_t, t, model_out)


def loss_weight(snr, weighting: str):
    """lambda(SNR) of the x0-space MSE (SPEC 4.3).

    'sqrt_snr' sqrt(SNR) (default), 'p2' SNR / sqrt(1 + SNR) (P2 with k=1, gamma=0.5),
    'snr' SNR (= eps-MSE), 'snr+1' SNR + 1 (= v-MSE), 'truncated_snr' max(SNR, 1).

    Args:
      snr: numpy (host, float64 kept) or jax array of SNR values.
      weighting: one of the names above.

    Returns:
      The weights, same type and shape as snr.
    """
    xp = jnp if isinstance(snr, jax.Array) else np
    if weighting == "sqrt_snr":
        return xp.sqrt(snr)
    if weighting == "p2":
        return snr / xp.sqrt(1.0 + snr)
    if weighting == "snr":
        return snr
    if weighting == "snr+1":
        return snr + 1.0
    if weighting == "truncated_snr":
        return xp.maximum(snr, 1.0)
    raise ValueError(f"unknown loss weighting {weighting!r}; accepted: {WEIGHTINGS}")


def learned_log_variance(schedule: Schedule, v: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """log sigma^2 = v log(beta_tilde_t) + (1 - v) log(beta_t), v in [0, 1] (SPEC 4.4).

    v = 1 gives the posterior variance beta_tilde (log clipped at t=0 to log beta_tilde_1, since
    beta_tilde_0 = 0), v = 0 gives beta. This is the orientation of the reference code and of the
    golden values (not guided-diffusion's frac = (out + 1) / 2 with frac on log beta).

    Args:
      schedule: the chain (respaced betas for a respaced chain, SPEC 5).
      v: the variance output, same shape as the image.
      t: int (B,) steps.

    Returns:
      float32 log variance, same shape as v.
    """
    v = _f32(v)
    min_log = extract(schedule.posterior_log_variance_clipped, t, v.ndim)
    max_log = extract(np.log(schedule.betas), t, v.ndim)
    return v * min_log + (1 - v) * max_log


def q_posterior_mean(
    schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray
) -> jnp.ndarray:
    """Mean of q(x_{t-1} | x_t, x0): coef1 x0 + coef2 x_t."""
    return (
        extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
    )


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    Kept in the reference's form. Near t = T its O(1) terms cancel to ~1e-6, so float32 leaves
    ~1% noise there; expm1(d) - d would be cleaner but would not reproduce the reference values
    (a few 1e-9 bits/dim apart, far below anything the loss or its gradient cares about).
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2)
    )


def _tanh_f32(u: jnp.ndarray) -> jnp.ndarray:
    """tanh, correctly rounded in float32 for |u| >= 1 (where the decoder NLL needs it).

    XLA's CPU tanh saturates to exactly 1 near |u| = 7.9 and is a few ulps off before that. In the
    decoder NLL, cdf_plus - cdf_min of two saturated CDFs is a difference of a few ulps, whose log
    then moves by whole nats: the golden decoder NLL (PyTorch, accurate tanhf) was 0.2% off with
    jnp.tanh. 1 - 2e/(1+e), e = exp(-2|u|), is accurate to 1 ulp there; jnp.tanh is kept below 1,
    where that form cancels.
    """
    a = jnp.abs(u)
    e = jnp.exp(-2.0 * a)
    tail = jnp.sign(u) * (1.0 - 2.0 * e / (1.0 + e))
    return jnp.where(a >= 1.0, tail, jnp.tanh(u))


def _approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    # The tanh approximation of the reference, kept so the decoder NLL matches it.
    return 0.5 * (1.0 + _tanh_f32(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jnp.ndarray, means: jnp.ndarray, log_scales: jnp.ndarray
) -> jnp.ndarray:
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised to bins of width 2/255.

    The edge bins extend to -inf / +inf. Probabilities are floored at 1e-12 as in the reference.

    Args:
      x: data in [-1, 1].
      means: Gaussian means, same shape.
      log_scales: log standard deviations, same shape.

    Returns:
      Elementwise log-likelihoods in nats.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def _mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(
    schedule: Schedule,
    x0: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    x0_hat: jnp.ndarray,
    log_variance: jnp.ndarray,
) -> jnp.ndarray:
    """One VLB term in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)), or the decoder NLL at t=0.

    Args:
      schedule: the chain.
      x0: clean data.
      x_t: z_t.
      t: int (B,) steps.
      x0_hat: the model's x0 prediction that sets the model mean.
      log_variance: the model's log variance.

    Returns:
      float32 (B,).
    """
    true_mean = q_posterior_mean(schedule, x0, x_t, t)
    true_log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    model_mean = q_posterior_mean(schedule, x0_hat, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, log_variance)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_variance)
    nll = _mean_flat(nll) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def training_losses(
    schedule: Schedule,
    model_mean_out: jnp.ndarray,
    model_var_out: jnp.ndarray | None,
    x0: jnp.ndarray,
    noise: jnp.ndarray,
    t: jnp.ndarray,
    parameterization: str = "x0",
    weighting: str = "sqrt_snr",
    learn_sigma: bool = True,
) -> dict[str, jnp.ndarray]:
    """Per-sample hybrid loss for a model output evaluated at z_t = q_sample(x0, t, noise).

    mse = mean over pixels of lambda_t (x0 - x0_hat)^2, x0_hat converted from any
    parameterisation (SPEC 4.3). With learn_sigma, vb = the VLB term in bits/dim (SPEC 4.4) with
    x0_hat stop-gradiented, so the VLB trains only the variance, unweighted; loss = mse + vb.

    Args:
      schedule: the full chain (t are original steps).
      model_mean_out: (B, H, W, C) mean part of the network output.
      model_var_out: (B, H, W, C) variance part v in [0, 1], or None when not learn_sigma.
      x0: (B, H, W, C) clean data in [-1, 1].
      noise: the standard normal noise that made z_t.
      t: int (B,) steps.
      parameterization: 'x0', 'eps' or 'v'.
      weighting: see loss_weight.
      learn_sigma: add the VLB term.

    Returns:
      dict of float32 (B,) arrays: 'loss', 'mse', 'vb' (zeros without learn_sigma).
    """
    x0 = _f32(x0)
    x_t = q_sample(schedule, x0, t, noise)
    x0_hat = predict_x0(schedule, model_mean_out, x_t, t, parameterization)
    weights = extract(loss_weight(schedule.snr, weighting), t, x0.ndim)
    mse = _mean_flat(weights * (x0 - x0_hat) ** 2)
    if not learn_sigma:
        return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}
    if model_var_out is None:
        raise ValueError("learn_sigma=True needs model_var_out, got None")
    log_variance = learned_log_variance(schedule, model_var_out, t)
    vb = vb_terms_bpd(schedule, x0, x_t, t, jax.lax.stop_gradient(x0_hat), log_variance)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
