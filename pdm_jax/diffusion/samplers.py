"""Reverse process: DDPM and DDIM steps, classifier-free guidance, the jitted loop (SPEC 5).

`schedule` here is the chain being sampled, usually respaced (`Schedule.respace`), and `index` an
int array (B,) into its tables; the network always sees the original step
`schedule.timesteps[index]`. Conversions between x0, eps and v use the respaced tables, which hold
the original abar at the kept steps, so they equal the full-chain conversions at original t.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pdm_jax.diffusion.losses import (
    eps_from_x0,
    extract,
    learned_log_variance,
    predict_x0,
    q_posterior_mean,
    x0_from_eps,
)
from pdm_jax.diffusion.schedules import Schedule

SAMPLERS = ("ddpm", "ddim")
FIXED_VARIANCES = ("small", "large")

# model_fn(x, t, y) -> (mean_out, var_out or None); t are original-chain steps, int32 (B,).
ModelFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray | None], tuple]


def clip_x0(x0: jnp.ndarray) -> jnp.ndarray:
    """Clips an x0 prediction to the data range [-1, 1] (unguided sampling, SPEC 5)."""
    return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0: jnp.ndarray, quantile: float = 0.995) -> jnp.ndarray:
    """Imagen's dynamic thresholding, per sample (guided sampling, SPEC 5).

    s = max(quantile of |x0| over the sample's pixels, 1); x0 is clipped to [-s, s] and divided
    by s, so a prediction already inside [-1, 1] is left unchanged.

    Args:
      x0: (B, ...) x0 prediction.
      quantile: the quantile of |x0|, nearest-rank as in both official ports (numpy's
        'nearest' method), not linearly interpolated.

    Returns:
      The thresholded x0, same shape.
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, quantile, axis=1, method="nearest"), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def guided_eps(eps_cond: jnp.ndarray, eps_uncond: jnp.ndarray, scale) -> jnp.ndarray:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u); w = 1 gives eps_c."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _fixed_variance_tables(
    schedule: Schedule, fixed_variance: str
) -> tuple[np.ndarray, np.ndarray]:
    if fixed_variance == "small":
        return schedule.posterior_variance, schedule.posterior_log_variance_clipped
    if fixed_variance == "large":
        # beta, with step 0 set to beta_tilde_1 for a better decoder likelihood (guided-diffusion).
        var = np.append(schedule.posterior_variance[1], schedule.betas[1:])
        return var, np.log(var)
    raise ValueError(f"unknown fixed_variance {fixed_variance!r}; accepted: {FIXED_VARIANCES}")


def _variance(
    schedule: Schedule, index: jnp.ndarray, model_var_out, ndim: int, fixed_variance: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
    if model_var_out is None:
        var, log_var = _fixed_variance_tables(schedule, fixed_variance)
        return extract(var, index, ndim), extract(log_var, index, ndim)
    # Learned: between the respaced beta' and beta_tilde' (SPEC 5), v = 1 -> beta_tilde'.
    log_var = learned_log_variance(schedule, model_var_out, index)
    return jnp.exp(log_var), log_var


def p_mean_variance(
    schedule: Schedule,
    index: jnp.ndarray,
    x_t: jnp.ndarray,
    model_mean_out: jnp.ndarray,
    model_var_out: jnp.ndarray | None,
    parameterization: str = "x0",
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    fixed_variance: str = "large",
) -> dict[str, jnp.ndarray]:
    """The Gaussian p(x_{i-1} | x_i) given a network output.

    Args:
      schedule: the (respaced) chain.
      index: int (B,) indices into it.
      x_t: (B, H, W, C) current sample.
      model_mean_out: mean part of the output, read as x0, eps or v.
      model_var_out: variance value v in [0, 1], or None for a fixed variance.
      parameterization: 'x0', 'eps' or 'v'.
      denoised_fn: applied to the x0 prediction before it sets the mean (clip_x0,
        dynamic_threshold or None for no clipping).
      fixed_variance: without model_var_out: 'large' (beta', the guided-diffusion default for
        models without learned sigma) or 'small' (beta_tilde').

    Returns:
      dict of float32 arrays shaped like x_t: 'mean', 'variance', 'log_variance', 'pred_xstart'.
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    pred_xstart = predict_x0(schedule, model_mean_out, x_t, index, parameterization)
    if denoised_fn is not None:
        pred_xstart = denoised_fn(pred_xstart)
    variance, log_variance = _variance(schedule, index, model_var_out, x_t.ndim, fixed_variance)
    return {
        "mean": q_posterior_mean(schedule, pred_xstart, x_t, index),
        "variance": variance,
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
    }


def _nonzero_mask(index: jnp.ndarray, ndim: int) -> jnp.ndarray:
    # No noise is added on the last step (index 0): its output is the sample.
    return (index != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def ddpm_step(
    rng: jax.Array, schedule: Schedule, index: jnp.ndarray, x_t: jnp.ndarray, out: dict
) -> jnp.ndarray:
    """Ancestral step x_{i-1} = mean + sigma z (no noise at index 0).

    Args:
      rng: PRNG key.
      schedule: the (respaced) chain (unused; kept for a uniform step signature).
      index: int (B,) current indices.
      x_t: current sample.
      out: the p_mean_variance dict.

    Returns:
      The next sample x_{i-1}.
    """
    del schedule
    noise = jax.random.normal(rng, x_t.shape, jnp.float32)
    return out["mean"] + _nonzero_mask(index, x_t.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_step(
    rng: jax.Array,
    schedule: Schedule,
    index: jnp.ndarray,
    x_t: jnp.ndarray,
    pred_xstart: jnp.ndarray,
    eps: jnp.ndarray,
    eta=0.0,
) -> jnp.ndarray:
    """DDIM step (Song et al. eq. 12): eta = 0 deterministic, eta = 1 ancestral with beta_tilde'.

    Args:
      rng: PRNG key.
      schedule: the (respaced) chain.
      index: int (B,) current indices.
      x_t: current sample.
      pred_xstart: x0 prediction (after clipping).
      eps: the eps consistent with (x_t, pred_xstart).
      eta: noise scale, a float or a traced scalar.

    Returns:
      The next sample x_{i-1}.
    """
    abar = extract(schedule.alphas_cumprod, index, x_t.ndim)
    abar_prev = extract(schedule.alphas_cumprod_prev, index, x_t.ndim)
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
    mean = pred_xstart * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
    noise = jax.random.normal(rng, x_t.shape, jnp.float32)
    return mean + _nonzero_mask(index, x_t.ndim) * sigma * noise


def sample_loop(
    model_fn: ModelFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    schedule: Schedule,
    *,
    sampler: str = "ddpm",
    eta=0.0,
    parameterization: str = "x0",
    labels: jnp.ndarray | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
    learn_sigma: bool = True,
    x_T: jnp.ndarray | None = None,
    clip_denoised: bool = True,
    fixed_variance: str = "large",
) -> jnp.ndarray:
    """Samples x0 with one lax.scan over the steps of `schedule`, last to first (SPEC 5).

    Jittable as a whole: wrap it in jax.jit with model_fn's parameters closed over or passed in,
    and everything but rng, labels, x_T and eta static. The model is called once per step:
    unguided with the labels (or None), or, when labels are given and guidance_scale != 1, once on
    the 2B batch [x, x] with labels [y, null_label]. Guidance mixes eps (eps_u + w (eps_c - eps_u)),
    the variance comes from the conditional half, and x0 is dynamically thresholded (99.5%); the
    unguided x0 is clipped to [-1, 1]. Expert dispatch (SPEC 6) belongs in model_fn, which sees the
    original t.

    Args:
      model_fn: (x, t, y) -> (mean_out, var_out or None); t original-chain int32 (B,).
      rng: PRNG key.
      shape: (B, H, W, C).
      schedule: the respaced chain to sample.
      sampler: 'ddpm' (ancestral) or 'ddim'.
      eta: DDIM noise scale.
      parameterization: how the mean output reads: 'x0', 'eps' or 'v'.
      labels: int (B,) class labels, or None for an unconditional model.
      null_label: the label of the unconditional branch (needed when guiding).
      guidance_scale: w, a Python number (it picks the computation).
      learn_sigma: use the model's variance output; else the fixed variance.
      x_T: the starting noise; drawn from rng when None.
      clip_denoised: process x0 (clip or threshold); False leaves it raw.
      fixed_variance: 'large' or 'small', used when not learn_sigma (DDPM only).

    Returns:
      float32 samples of `shape`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {SAMPLERS}")
    _fixed_variance_tables(schedule, fixed_variance)  # validates the name early
    guided = labels is not None and guidance_scale != 1.0
    if guided and null_label is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs null_label")
    n = schedule.num_steps
    # One split for x_T and every step: each PRNG op is a sizeable block of compiled code.
    keys = jax.random.split(rng, n + 1)
    x = jax.random.normal(keys[n], shape, jnp.float32) if x_T is None else x_T.astype(jnp.float32)
    batch = shape[0]
    timesteps = jnp.asarray(schedule.timesteps, jnp.int32)

    def denoise(x0):
        if not clip_denoised:
            return x0
        return dynamic_threshold(x0) if guided else clip_x0(x0)

    def step(x, inputs):
        i, key = inputs
        index = jnp.full((batch,), i, jnp.int32)
        t = jnp.full((batch,), timesteps[i], jnp.int32)
        if guided:
            # One 2B forward: conditional half first, null-label half second.
            x2, index2 = jnp.concatenate([x, x]), jnp.concatenate([index, index])
            y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
            mean_out, var_out = model_fn(x2, jnp.concatenate([t, t]), y)
            x0_both = predict_x0(schedule, mean_out, x2, index2, parameterization)
            eps_both = eps_from_x0(schedule, x2, index2, x0_both)
            eps = guided_eps(eps_both[:batch], eps_both[batch:], guidance_scale)
            x0 = x0_from_eps(schedule, x, index, eps)
            var_out = None if var_out is None else var_out[:batch]
        else:
            mean_out, var_out = model_fn(x, t, labels)
            x0 = predict_x0(schedule, mean_out, x, index, parameterization)
        if learn_sigma and var_out is None:
            raise ValueError("learn_sigma=True but model_fn returned no variance output")
        var_out = var_out if learn_sigma else None
        out = p_mean_variance(schedule, index, x, x0, var_out, "x0", denoise, fixed_variance)
        if sampler == "ddpm":
            x_next = ddpm_step(key, schedule, index, x, out)
        else:
            eps = eps_from_x0(schedule, x, index, out["pred_xstart"])
            x_next = ddim_step(key, schedule, index, x, out["pred_xstart"], eps, eta)
        return x_next, None

    steps = (jnp.arange(n - 1, -1, -1, dtype=jnp.int32), keys[:n])
    x, _ = jax.lax.scan(step, x, steps)
    return x
