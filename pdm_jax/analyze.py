"""Analysis job (``--mode=analyze``): how blurry is the optimal denoiser along the chain?

For a data set (the config's data section: demo set, image folder or tfds) this computes the
exact optimal denoiser E[x | z_t] of its empirical distribution (analysis/optimal_denoiser.py)
at timesteps across the chain, and reports per t and per patch size P the RMS of what PxP
average pooling removes from E[x | z_t], relative to the same RMS of the clean query images.
Queries are z_t of images held out of the data set (``analysis.held_out_queries``, default) or
of data images themselves. A ratio near 0 means the denoiser is already constant on PxP blocks,
i.e. a network predicting it at 1/P resolution loses nothing (PDM's premise, SPEC 1).

Writes ``<workdir>/analysis/optimal_denoiser_blur.json`` and ``.png`` and marks the ImageNet
expert split (SNR 0.25, SPEC 6).
"""

from __future__ import annotations

import hashlib
import io
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from pdm_jax.analysis.optimal_denoiser import blur_rmse, optimal_denoiser
from pdm_jax.data import pipeline
from pdm_jax.diffusion import schedules

SPLIT_SNR = 0.25  # the ImageNet-256 expert split (SPEC 6)
OUTPUT_NAME = "optimal_denoiser_blur"


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


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the analysis section against the data section; raises ValueError naming the value."""
    a = config.analysis
    for key in ("num_data", "num_queries", "chunk_size"):
        if int(a[key]) < 1:
            raise ValueError(f"analysis.{key} must be >= 1, got {a[key]}.")
    if a.num_queries > a.num_data and not a.held_out_queries:
        raise ValueError(f"analysis.num_queries={a.num_queries} exceeds analysis.num_data="
                         f"{a.num_data} (in-sample queries are made from data images).")
    size = int(config.data.image_size)
    for p in a.patch_sizes:
        if p < 1 or size % p:
            raise ValueError(f"analysis.patch_sizes has {p}, which does not divide "
                             f"data.image_size={size}.")
    schedules.make_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
    analysis_timesteps(a, config.diffusion.num_timesteps)


def load_images(data_config: ml_collections.ConfigDict, num_data: int, seed: int) -> np.ndarray:
    """Up to ``num_data`` distinct images (N, S, S, 3) in [-1, 1] from the data section.

    Reads the (shuffled, unflipped) training stream and drops repeats, so a data set smaller
    than ``num_data`` yields each of its images once.
    """
    data = dict(data_config.to_dict(), random_flip=False, class_conditional=False)
    batch = min(num_data, 256)
    stream = pipeline.iterate_numpy(pipeline.make_train_dataset(
        data, global_batch_size=batch, seed=seed, process_index=0, process_count=1))
    images, seen, read = [], set(), 0
    # Every image of an epoch comes before any repeat; a full epoch of repeats ends the read.
    while len(images) < num_data and read < 2 * num_data + batch:
        for image in next(stream)["image"]:
            read += 1
            key = hashlib.sha1(image.tobytes()).digest()
            if key not in seen and len(images) < num_data:
                seen.add(key)
                images.append(image)
    if len(images) < num_data:
        logging.info("The data set holds %d distinct images (< analysis.num_data=%d).",
                     len(images), num_data)
    return np.stack(images).astype(np.float32)


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


def _write_atomic(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(payload)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the analysis of ``config`` and writes its JSON table and plot under workdir/analysis.

    Returns:
      The result dict written to the JSON file.
    """
    validate(config)
    a, d = config.analysis, config.diffusion
    schedule = schedules.Schedule.from_name(d.schedule, d.num_timesteps)
    timesteps = analysis_timesteps(a, d.num_timesteps)
    held_out = bool(a.held_out_queries)
    images = load_images(config.data, int(a.num_data) + held_out * int(a.num_queries),
                         config.seed)
    if held_out:
        # Queries from images outside the data set: E[x | z_t] cannot simply return the query
        # image at high SNR (which in-sample queries show: the empirical optimum memorises).
        if len(images) < 2 * int(a.num_queries):
            raise ValueError(f"held_out_queries needs more than 2 x num_queries={a.num_queries} "
                             f"distinct images; the data set has {len(images)}.")
        num_queries = int(a.num_queries)
        data, queries = images[:-num_queries], images[-num_queries:]
    else:
        data, queries = images, images[:min(int(a.num_queries), len(images))]
    logging.info("Optimal denoiser of %d images (%s), %d queries, %d timesteps",
                 len(data), data.shape[1:], len(queries), len(timesteps))
    patch_sizes = [int(p) for p in a.patch_sizes]
    table = blur_table(data, queries, schedule, timesteps, patch_sizes, int(a.chunk_size),
                       config.seed)
    dataset = config.data.folder if config.data.name == pipeline.FOLDER_NAME else config.data.name
    result = {"dataset": dataset, "image_size": int(config.data.image_size),
              "num_data": len(data), "num_queries": len(queries),
              "held_out_queries": held_out, "schedule": d.schedule,
              "num_timesteps": d.num_timesteps, "patch_sizes": patch_sizes,
              "split_snr": SPLIT_SNR, "split_t": split_timestep(schedule), **table}
    out = f"{workdir}/analysis"
    tf.io.gfile.makedirs(out)
    _write_atomic(f"{out}/{OUTPUT_NAME}.json", json.dumps(result, indent=1).encode())
    _write_atomic(f"{out}/{OUTPUT_NAME}.png", plot(result))
    logging.info("Wrote %s/%s.{json,png}", out, OUTPUT_NAME)
    return result
