"""Evaluation jobs of a training workdir: ``--mode=eval`` and ``--mode=ref_stats`` (SPEC 9).

``eval`` samples ``eval.num_samples`` images with the EMA experts (``sample`` section: sampler,
steps, guidance, eta, seed) and scores them against ``eval.ref_path`` (:func:`make_scorer`);
the metrics are logged and written to ``<workdir>/eval/<name>.json``. Training reuses the
scorer for FID on a small sample count every ``train.fid_every`` steps.

``ref_stats`` builds a reference batch from the dataset of the ``data`` section (the training
pipeline without flips, one pass, at most ``eval.num_samples`` images, each process its own
part) and writes ``<workdir>/ref_stats/<dataset>_<size>.npz`` in ADM's layout.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from pdm_jax import config_lib, metrics as run_metrics, sharding
from pdm_jax.diffusion import schedules
from pdm_jax.evaluation import features, metrics, npz_stats

# Reference images kept in a written reference file (ADM's ImageNet batches hold 10k), unless
# they exceed this many bytes (e.g. 10k images at 1024^2): then only statistics and features.
MAX_REF_IMAGE_BYTES = 4 << 30


def _check_inception_path(config: ml_collections.ConfigDict) -> str:
    path = config.eval.inception_path
    hint = "convert the weights with: python -m pdm_jax.convert_inception --out=PATH"
    if not path:
        raise ValueError(f"config.eval.inception_path is empty; {hint}, then pass "
                         f"--config.eval.inception_path=PATH.")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"config.eval.inception_path={path!r} does not exist; {hint}.")
    return path


def _check_reference(config: ml_collections.ConfigDict, evaluating: str) -> None:
    e = config.eval
    _check_inception_path(config)
    if not e.ref_path:
        raise ValueError(f"config.eval.ref_path is empty ({evaluating} needs it): pass an ADM "
                         f"reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or one written "
                         f"by --mode=ref_stats.")
    if not tf.io.gfile.exists(e.ref_path):
        raise FileNotFoundError(f"config.eval.ref_path={e.ref_path!r} does not exist (make one "
                                f"with --mode=ref_stats).")
    npz_stats.describe(e.ref_path)  # Raises for a file without images or statistics.
    if e.batch_size <= 0 or e.batch_size % jax.device_count():
        raise ValueError(f"eval.batch_size={e.batch_size} must be a positive multiple of the "
                         f"{jax.device_count()} devices.")


def _check_eval_config(config: ml_collections.ConfigDict) -> None:
    """Every eval setting, checked in milliseconds before checkpoints or compiles."""
    config_lib.validate(config)
    _check_reference(config, "--mode=eval")
    if config.eval.num_samples < 2:
        raise ValueError(f"eval.num_samples must be >= 2, got {config.eval.num_samples}.")


def check_periodic_fid(config: ml_collections.ConfigDict) -> None:
    """Checks the FID-during-training settings (``train.fid_every`` > 0) before any compile."""
    t = config.train
    _check_reference(config, f"train.fid_every={t.fid_every}")
    if t.fid_num_samples < 2:
        raise ValueError(f"train.fid_num_samples must be >= 2, got {t.fid_num_samples}.")
    schedules.respace_timesteps(t.fid_steps, config.diffusion.num_timesteps)


def eval_name(config: ml_collections.ConfigDict) -> str:
    """``<sampler><steps>_w<guidance>_eta<eta>_n<num>_<ref file stem>``."""
    s = config.sample
    ref = os.path.splitext(os.path.basename(config.eval.ref_path))[0]
    return (f"{s.sampler}{s.steps}_w{s.guidance_scale:g}_eta{s.eta:g}_n{config.eval.num_samples}"
            f"_{ref}")


def make_scorer(config: ml_collections.ConfigDict, mesh: Any, *, num_samples: int,
                steps: str) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """Loads Inception and the reference once; returns ``score(emas) -> metrics``.

    ``score`` samples ``num_samples`` images with the given EMA parameters (one per expert, in
    config order) using the ``sample`` section's sampler, eta, guidance and seed with respacing
    ``steps``, in global batches of ``eval.batch_size`` over every device of every process. Each
    batch goes straight through Inception on the same devices, each process folds only its own
    rows into streaming statistics, and those are merged across processes (no image is
    gathered). With the same batch size and seed it scores the very images ``--mode=sample``
    writes.

    Args:
      config: run config (checked by the caller).
      mesh: device mesh.
      num_samples: images per call.
      steps: respacing string of the sampler.

    Returns:
      The scoring function; its dict is evaluate.compute_metrics' plus the sampling settings.
    """
    from pdm_jax import evaluate, sample
    from pdm_jax.evaluation import inception
    from pdm_jax.experts import experts_from_config

    e, s = config.eval, config.sample
    extractor = inception.load_inception(e.inception_path)
    # The reference first: it is cheap and a bad file fails before any sampling. Every process
    # computes the same reference statistics from the whole file (its rows of a replicated feed).
    ref = evaluate.load_side(e.ref_path, extractor, mesh, e.batch_size // jax.process_count())
    num_classes = experts_from_config(config)[0].model.num_classes
    sample_fn = sample.make_sample_fn(config, mesh, steps=steps, sampler=s.sampler, eta=s.eta,
                                      guidance_scale=s.guidance_scale, batch_size=e.batch_size)
    feature_fn = features.make_feature_fn(extractor, mesh)
    local_cap = math.ceil(num_samples / jax.process_count())

    def score(emas: Sequence[Any]) -> dict[str, Any]:
        stats = features.empty_stats(extractor, max_sample=local_cap)
        # As --mode=sample: batch `start` uses fold_in(rng, start).
        rng = jax.random.PRNGKey(s.seed)
        t0 = time.time()
        for start in range(0, num_samples, e.batch_size):
            labels = sample.balanced_labels(start, e.batch_size, num_classes)
            images = sample_fn(list(emas), jax.random.fold_in(rng, start), jnp.asarray(labels))
            stats = stats.update(features.local_rows(feature_fn(images),
                                                     limit=num_samples - start))
            done = min(start + e.batch_size, num_samples)
            rate = done / max(time.time() - t0, 1e-9)
            logging.info("Evaluated %d/%d samples, %.3g images/s, ETA %s", done, num_samples,
                         rate, run_metrics.format_duration((num_samples - done) / rate))
        stats = metrics.merge_across_processes(stats, max_sample=num_samples)
        result = evaluate.compute_metrics(ref, npz_stats.BatchStats.from_feature_stats(stats))
        result.update(sampler=s.sampler, steps=steps, guidance_scale=s.guidance_scale, eta=s.eta,
                      seed=s.seed, ref_path=e.ref_path, inception_path=e.inception_path,
                      inception_source=extractor.source,
                      sample_and_feature_seconds=time.time() - t0)
        return result

    return score


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``--mode=eval``: FID/sFID/IS/precision/recall of the EMA experts' samples.

    Returns:
      The metrics dict that is also written to ``<workdir>/eval/<name>.json``.
    """
    from pdm_jax import evaluate, sample
    from pdm_jax.experts import experts_from_config

    _check_eval_config(config)
    e, s = config.eval, config.sample
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    score = make_scorer(config, mesh, num_samples=e.num_samples, steps=s.steps)
    emas = [sample.load_expert_ema(workdir, x.index, mesh, config)
            for x in experts_from_config(config)]
    result = score(emas)
    logging.info("Eval (%s, steps=%s, w=%g, eta=%g, %d samples vs %s):\n%s", s.sampler, s.steps,
                 s.guidance_scale, s.eta, e.num_samples, e.ref_path,
                 evaluate.format_metrics(result))
    if jax.process_index() == 0:
        out_dir = f"{workdir}/eval"
        tf.io.gfile.makedirs(out_dir)
        path = f"{out_dir}/{eval_name(config)}.json"
        with tf.io.gfile.GFile(f"{path}.tmp", "w") as f:
            json.dump(result, f, indent=2)
        tf.io.gfile.rename(f"{path}.tmp", path, overwrite=True)
        logging.info("Wrote %s", path)
    return result


def _dataset_size(data_config: ml_collections.ConfigDict) -> int:
    """Records in the data section's split (the dataset must be prepared already)."""
    import tensorflow_datasets as tfds

    from pdm_jax.data import pipeline

    if data_config.name == pipeline.FOLDER_NAME:
        return len(pipeline.scan_image_folder(data_config.folder).paths)
    builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
    return int(builder.info.splits[data_config.split].num_examples)


def ref_stats_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``<workdir>/ref_stats/<dataset>_<image size>.npz``."""
    name = config.data.name.replace("/", "_").replace(":", "_")
    if config.data.name == "folder":
        name = f"folder_{os.path.basename(os.path.normpath(config.data.folder))}"
    return f"{workdir}/ref_stats/{name}_{config.data.image_size}.npz"


def run_ref_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``--mode=ref_stats``: a reference batch of the run's dataset, in ADM's layout.

    Uses at most ``eval.num_samples`` images (all of the split when it is smaller) read once
    through the training pipeline without flips (shuffled with the data section's buffer and
    ``seed``, so a subset is a random one); every process reads its own part.

    Returns:
      Path of the written .npz.
    """
    from pdm_jax.data import pipeline
    from pdm_jax.evaluation import inception

    _check_inception_path(config)
    e = config.eval
    process_count = jax.process_count()
    if e.batch_size <= 0 or e.batch_size % jax.device_count():
        raise ValueError(f"eval.batch_size={e.batch_size} must be a positive multiple of the "
                         f"{jax.device_count()} devices.")
    data_config = config.data.to_dict()
    data_config["random_flip"] = False
    ds = pipeline.make_train_dataset(data_config, global_batch_size=e.batch_size, seed=config.seed,
                                     process_index=jax.process_index(),
                                     process_count=process_count)
    size = _dataset_size(config.data)
    # Each process's stream starts with one pass over its size // process_count records.
    per_process = min(size // process_count, math.ceil(e.num_samples / process_count))
    if per_process * process_count < 2:
        raise ValueError(f"{config.data.name!r} ({config.data.split}) has {size} images; "
                         f"reference statistics need at least 2 per run.")
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    extractor = inception.load_inception(e.inception_path)
    local_batch = e.batch_size // process_count
    image_bytes = config.data.image_size ** 2 * 3
    keep = min(npz_stats.REF_IMAGES, per_process * process_count)
    keep_images = keep * image_bytes <= MAX_REF_IMAGE_BYTES
    local_keep = math.ceil(keep / process_count)

    def batches():
        remaining = per_process
        for batch in pipeline.iterate_numpy(ds):
            if remaining <= 0:
                return
            images = run_metrics.to_uint8(batch["image"][:remaining])  # Exact: x = u / 127.5 - 1.
            remaining -= len(images)
            yield images

    logging.info("Reference statistics of %d images of %s (%s) at %d px", per_process *
                 process_count, config.data.name, config.data.split, config.data.image_size)
    stats, images = features.accumulate_host_batches(
        features.make_feature_fn(extractor, mesh), batches(),
        features.empty_stats(extractor, max_sample=local_keep), mesh, local_batch,
        keep_images=local_keep if keep_images else 0)
    stats = metrics.merge_across_processes(stats, max_sample=keep)
    if keep_images:
        images = np.concatenate(metrics.allgather_rows(images, local_keep))[:keep]
    else:
        logging.warning("Not storing %d reference images of %d px (over %d GiB): the file has "
                        "statistics and pool_features only.", keep, config.data.image_size,
                        MAX_REF_IMAGE_BYTES >> 30)
        images = None
    path = ref_stats_path(config, workdir)
    if jax.process_index() == 0:
        tf.io.gfile.makedirs(os.path.dirname(path))
        npz_stats.save_reference(path, stats, images)
        logging.info("Wrote reference statistics of %d images (%d kept for precision/recall) to "
                     "%s", stats.count, len(stats.pool_sample), path)
    return path
