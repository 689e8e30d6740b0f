"""How blurry is the optimal denoiser along the chain? Tables and plots (PDM's premise, SPEC 1).

For a data set and timesteps t, :func:`blur_table` reports per patch size P the RMS of what PxP
average pooling removes from the exact optimal denoiser E[x | z_t] (optimal_denoiser.py),
relative to the same RMS of the clean query images. A ratio near 0 means the denoiser is
already constant on PxP blocks: a network predicting it at 1/P resolution loses nothing.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from pdm_jax.analysis.optimal_denoiser import blur_rmse, optimal_denoiser
from pdm_jax.diffusion import schedules

SPLIT_SNR = 0.25  # the ImageNet-256 expert split (SPEC 6)


def analysis_timesteps(analysis: ml_collections.ConfigDict, num_timesteps: int) -> list[int]:
    """The steps to analyse: ``analysis.timesteps`` if given, else ``num_timesteps`` evenly spaced.

    Raises:
      ValueError: a step outside [0, T) or a count < 1.
    """
    explicit = [int(t) for t in (analysis.timesteps or ())]
    if explicit:
        bad = [t for t in explicit if not 0 <= t < num_timesteps]
        if bad:
            raise ValueError(f"analysis.timesteps has {bad} outside [0, {num_timesteps}).")
        return sorted(set(explicit))
    count = int(analysis.num_timesteps)
    if count < 1:
        raise ValueError(f"analysis.num_timesteps must be >= 1, got {count}.")
    return sorted(set(np.linspace(0, num_timesteps - 1, count).round().astype(int).tolist()))


def split_timestep(schedule: schedules.Schedule, snr: float = SPLIT_SNR) -> int:
    """The first step t whose SNR is <= ``snr`` (t = 396 for 'linear' and 0.25)."""
    return int(np.nonzero(schedule.snr <= snr)[0][0])


def blur_table(data: np.ndarray, queries: np.ndarray, schedule: schedules.Schedule,
               timesteps: list[int], patch_sizes: list[int], chunk_size: int,
               seed: int) -> dict:
    """Relative blur of E[x | z_t] per t and P.

    Args:
      data: (N, H, W, C) the empirical distribution.
      queries: (B, H, W, C) clean images the noisy queries z_t are made from.
      schedule: the full chain.
      timesteps: steps t to evaluate.
      patch_sizes: P values.
      chunk_size: data chunk of the streaming sum.
      seed: noise seed (the same noise for every t).

    Returns:
      {"clean_blur_rmse": {P: r}, "rows": [{"t", "snr", "abar", "denoiser_blur_rmse": {P: r},
      "relative_blur": {P: ratio}}, ...]}.
    """
    noise = jax.random.normal(jax.random.PRNGKey(seed), queries.shape, jnp.float32)
    clean = {p: float(blur_rmse(queries, p)) for p in patch_sizes}
    rows = []
    for t in timesteps:
        abar = float(schedule.alphas_cumprod[t])
        z = np.sqrt(abar) * queries + np.sqrt(1.0 - abar) * noise
        denoised = optimal_denoiser(data, z, abar, chunk_size)
        blur = {p: float(blur_rmse(denoised, p)) for p in patch_sizes}
        rows.append({"t": t, "snr": float(schedule.snr[t]), "abar": abar,
                     "denoiser_blur_rmse": {str(p): blur[p] for p in patch_sizes},
                     "relative_blur": {str(p): blur[p] / clean[p] if clean[p] > 0 else 0.0
                                       for p in patch_sizes}})
        logging.info("t=%d SNR=%.3g relative blur %s", t, schedule.snr[t],
                     {p: round(r, 4) for p, r in rows[-1]["relative_blur"].items()})
    return {"clean_blur_rmse": {str(p): clean[p] for p in patch_sizes}, "rows": rows}


def plot(result: dict) -> bytes:
    """PNG bytes: relative blur vs t, one line per P, the SNR-0.25 split marked."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    t = [r["t"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for p in result["patch_sizes"]:
        ax.plot(t, [r["relative_blur"][str(p)] for r in result["rows"]], marker="o",
                markersize=3, label=f"P={p}")
    split = result["split_t"]
    ax.axvline(split, color="k", linestyle="--", linewidth=1)
    low, high = ax.get_ylim()
    ax.text(split, low + 0.03 * (high - low), f" SNR {SPLIT_SNR} (t={split})", va="bottom",
            fontsize=8)
    ax.set_xlabel(f"t ({result['schedule']} schedule, T={result['num_timesteps']})")
    ax.set_ylabel("RMSE(D - blur_P D) / RMSE(x - blur_P x)")
    queries = "held-out" if result["held_out_queries"] else "in-sample"
    ax.set_title(f"Patch detail in E[x | z_t]: {result['dataset']}, N={result['num_data']}, "
                 f"{result['num_queries']} {queries} queries", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
