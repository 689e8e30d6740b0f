"""End to end on 8 virtual CPU devices (mesh data=8): train, resume, stop, sample.

Every run uses ``configs/demo.py:smoke``: a two-expert ensemble of tiny U-Nets (16x16, 8
classes, batch 16; patch 2 for SNR > 0.25, patch 4 below) trained together, and changes only
host-side settings (data source, step counts, checkpoint interval), so every ``train()`` call
lowers the SAME train step. A per-module persistent XLA cache therefore compiles it once (the
longest part of this file on a 2-core machine) and loads it in seconds after that, the
subprocess included; without the cache this file would take several times as long.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import REPO, TRAINED_STEPS, demo_config, folder_config
from pdm_jax import checkpointing, sharding, writers
from pdm_jax.data import pipeline
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.jobs import sample, train
from pdm_jax.training import state as state_lib
from pdm_jax.training.step import NonFiniteLossError, jit_train_step

N = 4  # steps of the first half of the resume test; ckpt.every = N
BATCH = 16  # the smoke config's global batch
MOCK_EXAMPLES = 40  # the resume point N * BATCH = 64 lies inside epoch 1 (offset 24)

# Shares the session's trained run with test_export.py (one worker trains it once).
pytestmark = pytest.mark.xdist_group("trained_run")


def tfds_config(data_dir, *, num_steps: int, ckpt_every: int):
    """The smoke config on tfds colorectal_histology (8 classes, like the smoke model)."""
    c = demo_config("smoke")
    c.data.update(name="colorectal_histology", data_dir=str(data_dir), class_conditional=True,
                  cache=False)
    c.train.num_steps, c.ckpt.every = num_steps, ckpt_every
    return c


def mock_tfds(data_dir, num_examples: int = MOCK_EXAMPLES):
    """Deterministic random tfds examples (seed 0), offline.

    USE_CODE takes the features from the builder's code; the default policy would first try to
    fetch the dataset's metadata over the network.
    """
    return tfds.testing.mock_data(num_examples=num_examples, data_dir=str(data_dir),
                                  policy=tfds.testing.MockPolicy.USE_CODE)


def loss_rows(workdir) -> list[dict]:
    """The metrics file's loss records (rate records are separate)."""
    with open(os.path.join(workdir, writers.METRICS_FILE)) as f:
        return [row for row in map(json.loads, f) if "loss" in row]


EXPERTS = ("snr_0.25_inf", "snr_0_0.25")  # the smoke ensemble's checkpoint sub-directories


def checkpoint_steps(workdir) -> dict[str, list[int]]:
    """{expert name: committed checkpoint steps}."""
    root = os.path.join(workdir, "checkpoints")
    steps = {}
    for name in sorted(os.listdir(root)):
        with checkpointing.Checkpointer(os.path.join(root, name)) as ckpt:
            steps[name] = ckpt.all_steps()
    return steps


def restore_states(config, workdir) -> dict[str, tuple[dict, dict]]:
    """{expert name: (latest train state, metadata)} laid out for the current 8-device mesh."""
    mesh = sharding.make_mesh(config.mesh.shape)
    restored = {}
    for setup in state_lib.setup_experts(config, mesh):
        with checkpointing.Checkpointer(
                checkpointing.expert_checkpoint_dir(str(workdir), setup.name),
                signature=setup.signature) as ckpt:
            restored[setup.name] = ckpt.restore(setup.abstract)
    return restored


def host_leaves(tree) -> dict[str, np.ndarray]:
    """{'params/down_0/...': numpy array} for every leaf (typed PRNG keys as key data)."""
    def to_numpy(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))
    return {sharding.path_str(p): to_numpy(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def compiled_train_step(config):
    """The jitted train step exactly as training builds it (so the XLA cache serves it), and the
    freshly initialised per-expert states training would start from."""
    mesh = sharding.make_mesh(config.mesh.shape)
    setups = state_lib.setup_experts(config, mesh)
    schedule = Schedule.from_name(config.diffusion.schedule, config.diffusion.num_timesteps)
    step_fn = jit_train_step(config, setups, schedule, mesh)
    initial = {s.name: s.create_state() for s in setups}
    return step_fn, {s.name: s.shardings for s in setups}, mesh, initial


#### Module fixtures: one XLA cache, one image folder, two sets of runs ####


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs on mock tfds data: N steps then resumed to 2N in one workdir, 2N straight in
    another; plus a copy of the first workdir as it was at step N (for the non-finite test)."""
    root = tmp_path_factory.mktemp("runs")
    tfds_dir, resumed, straight = root / "tfds", root / "resumed", root / "straight"
    config = tfds_config(tfds_dir, num_steps=2 * N, ckpt_every=N)
    with mock_tfds(tfds_dir):
        first = train.run(tfds_config(tfds_dir, num_steps=N, ckpt_every=N), str(resumed))
        result = types.SimpleNamespace(
            config=config, tfds_dir=tfds_dir, resumed=resumed, straight=straight,
            at_n=root / "at_n", first_state=host_leaves(first), first_rows=loss_rows(resumed),
            first_ckpts=checkpoint_steps(resumed))
        shutil.copytree(resumed, result.at_n)
        result.resumed_state = host_leaves(train.run(config, str(resumed)))
        result.straight_state = host_leaves(train.run(config, str(straight)))
    return result


#### 1. A few steps on an image folder and on (mock) tfds data ####


def check_rows(rows, steps):
    assert [r["step"] for r in rows] == list(steps)
    for r in rows:
        assert np.isfinite(r["loss"]) and 0 < r["loss"] < 100, r
        for name in EXPERTS:
            assert np.isfinite(r[f"{name}/grad_norm"]) and np.isfinite(r[f"{name}/mse"]), r
        # The run's loss is the sum of the experts' losses (each on its own SNR interval).
        assert r["loss"] == pytest.approx(sum(r[f"{name}/loss"] for name in EXPERTS), rel=1e-5)


@pytest.mark.slow
def test_folder_run_logs_finite_metrics_and_checkpoints_every_expert(trained_run):
    workdir = trained_run.workdir
    check_rows(loss_rows(workdir), range(2, TRAINED_STEPS + 1, 2))  # log_every=2
    with open(workdir / writers.METRICS_FILE) as f:
        rates = [row for row in map(json.loads, f) if "images_per_s" in row]
    assert [r["step"] for r in rates] == list(range(2, TRAINED_STEPS + 1, 2))
    assert all(r["images_per_s"] == pytest.approx(BATCH * r["steps_per_s"]) for r in rates)
    assert checkpoint_steps(workdir) == {name: [TRAINED_STEPS] for name in EXPERTS}
    for name, state in trained_run.state.items():
        assert int(state["step"]) == TRAINED_STEPS
        assert all(np.isfinite(v).all() for v in host_leaves(state["params"]).values()), name
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["folder"] == trained_run.config.data.folder
    assert os.listdir(workdir / "leases") == []  # released at the end


@pytest.mark.slow
def test_tfds_run_logs_finite_metrics_and_checkpoints_every_expert(runs):
    check_rows(runs.first_rows, [2, 4])
    assert runs.first_ckpts == {name: [N] for name in EXPERTS}
    for name in EXPERTS:
        assert int(runs.first_state[f"{name}/step"]) == N
    assert all(np.isfinite(v).all() for v in runs.first_state.values())


def test_more_data_classes_than_model_classes_is_refused_before_compiling(tmp_path):
    """Labels >= model.num_classes would be the null label or embed as NaN: refused up front."""
    config = tfds_config(tmp_path / "tfds", num_steps=2, ckpt_every=2)
    config.model.num_classes = 4
    with mock_tfds(tmp_path / "tfds", num_examples=8):
        with pytest.raises(ValueError, match=r"has 8 classes but model.num_classes=4"):
            train.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


#### 2. Training lowers the loss ####


@pytest.mark.slow
def test_training_lowers_a_fixed_evaluation_of_the_loss(trained_run):
    """The train step's own losses at initial vs trained params, on the same x0, t, noise, labels.

    The evaluation runs the compiled train step on a copy of each state with the same step and
    rng (so t, noise and label dropout are equal) and reads the losses it reports for the
    parameters it was given (its update is discarded).
    """
    config = trained_run.config
    step_fn, shardings, mesh, initial = compiled_train_step(config)
    first = next(pipeline.iterate_numpy(pipeline.make_train_dataset(
        config.data, global_batch_size=BATCH, seed=1, process_index=0, process_count=1)))
    batch = sharding.global_batch({k: first[k] for k in ("image", "label")}, mesh)
    keys = ["loss"] + [f"{name}/{term}" for name in EXPERTS for term in ("loss", "mse")]

    def fixed_eval(state) -> dict[str, float]:
        host = jax.device_get(state)
        draws = []
        for k in range(4):  # 4 x 16 (t, noise, label dropout) draws per expert, fixed
            probe = {name: dict(s, step=np.int32(0), rng=np.asarray(jax.random.PRNGKey(100 + k)))
                     for name, s in host.items()}
            probe = jax.device_put(probe, shardings)
            with jax.transfer_guard("disallow"):  # the step itself moves no data implicitly
                _, m = step_fn(probe, batch)
            draws.append({key: float(jax.device_get(m[key])) for key in keys})
        return {key: float(np.mean([d[key] for d in draws])) for key in keys}

    before, after = fixed_eval(initial), fixed_eval(trained_run.state)
    print(f"fixed evaluation: initial {before}, after {TRAINED_STEPS} steps {after}")
    # Measured: the total falls about 4x (9.6 -> 2.3); untrained parameters would give 1x.
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    for name in EXPERTS:  # each expert learned, not only the sum
        assert after[f"{name}/mse"] < 0.7 * before[f"{name}/mse"], (name, before, after)


#### 3. Resume ####


@pytest.mark.slow
def test_resume_from_checkpoint_is_bitwise_identical_to_an_uninterrupted_run(runs):
    resumed, straight = runs.resumed_state, runs.straight_state
    assert resumed.keys() == straight.keys()
    for name in EXPERTS:
        assert int(resumed[f"{name}/step"]) == 2 * N
    for key in resumed:  # per expert: params, ema, opt_state (Adam moments, count), step, rng
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    # The second half really trained: every expert's params moved since step N.
    for name in EXPERTS:
        assert any(not np.array_equal(runs.first_state[k], resumed[k]) for k in resumed
                   if k.startswith(f"{name}/params/")), name
    # Same batches after the resume: the losses logged at steps N+1..2N agree too.
    resumed_rows = {r["step"]: r for r in loss_rows(runs.resumed)}
    straight_rows = {r["step"]: r for r in loss_rows(runs.straight)}
    assert sorted(resumed_rows) == sorted(straight_rows) == [2, 4, 6, 8]
    for step in (6, 8):
        assert resumed_rows[step]["loss"] == straight_rows[step]["loss"], step
    want = {name: [N, 2 * N] for name in EXPERTS}
    assert checkpoint_steps(runs.resumed) == checkpoint_steps(runs.straight) == want


#### 5. Non-finite loss ####


@pytest.mark.slow
def test_non_finite_loss_stops_without_checkpointing_the_bad_step(runs, monkeypatch):
    """Resumes the step-N copy; the 1st batch is clean, from the 2nd on the images are NaN.

    NaN inputs make the loss and gradients NaN inside the unchanged (cached) train step. With
    ckpt.every=1, step N+1 is saved; step N+2 must raise and save nothing.
    """
    real_iterate = pipeline.iterate_numpy

    def poisoned(ds):
        for i, batch in enumerate(real_iterate(ds)):
            if i >= 1:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(pipeline, "iterate_numpy", poisoned)
    config = tfds_config(runs.tfds_dir, num_steps=100, ckpt_every=1)
    with mock_tfds(runs.tfds_dir):
        with pytest.raises(NonFiniteLossError,
                           match=rf"at step {N + 2} \(loss=nan\); the state was kept at step "
                                 rf"{N + 1}"):
            train.run(config, str(runs.at_n))
    assert checkpoint_steps(runs.at_n) == {name: [N, N + 1] for name in EXPERTS}
    for name, (state, meta) in restore_states(config, runs.at_n).items():
        assert int(state["step"]) == N + 1, name
        assert meta["data_position"] == {"records_consumed_per_process": [(N + 1) * BATCH]}
        assert all(np.isfinite(v).all() for v in host_leaves(state).values()), name


#### 6. Sampling ####


@pytest.mark.slow
def test_sample_writes_npz_with_balanced_labels_and_a_png_grid(runs):
    config = runs.config.copy_and_resolve_references()
    config.sample.update(num_samples=20, batch_size=16, name="e2e")  # 2 batches, the last cut
    path = sample.run(config, str(runs.straight))
    assert path == os.path.join(str(runs.straight), "samples", "e2e.npz")
    with np.load(path) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 3)
    np.testing.assert_array_equal(labels, np.arange(20) % 8)
    # The PNG tiles the same images: 5 columns x 4 rows of 16 px with 2 px padding, upscaled 2x
    # (nearest) to reach 256 px per side at least.
    with Image.open(runs.straight / "samples" / "e2e.png") as png:
        assert png.format == "PNG" and png.size == (2 * (5 * 18 + 2), 2 * (4 * 18 + 2))
        grid = np.asarray(png.convert("RGB"))[::2, ::2]
    for i in (0, 7, 19):
        row, col = divmod(i, 5)
        np.testing.assert_array_equal(
            grid[2 + 18 * row:18 + 18 * row, 2 + 18 * col:18 + 18 * col], images[i])


#### 4. SIGTERM ####


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path, folder16,
                                                                 trained_run):
    """``python -m pdm_jax.main`` for 1000 steps, SIGTERM after the first progress line.

    Uses ``trained_run`` only so that the XLA cache holds the train step before it starts.
    """
    workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
    # Same numerics and (session) cache as this process: the train step is loaded, not compiled.
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
    command = [sys.executable, "-m", "pdm_jax.main", "--config=configs/demo.py:smoke,steps=1000",
               f"--workdir={workdir}", "--config.ckpt.every=1000", "--config.data.name=folder",
               f"--config.data.folder={folder16}"]
    with open(log, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                   stderr=err)
    try:
        deadline = time.monotonic() + 300
        while "step 2/1000" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no progress line within 300 s"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = log.read_text()
    assert returncode == 0, stderr[-3000:]
    assert "Stop requested" in stderr
    steps = checkpoint_steps(workdir)
    (step,) = steps[EXPERTS[0]]
    assert steps == {name: [step] for name in EXPERTS} and 2 <= step < 1000
    config = folder_config(folder16, num_steps=1000, ckpt_every=1000)
    for name, (state, meta) in restore_states(config, workdir).items():
        assert int(state["step"]) == step, name
        assert meta["data_position"] == {"records_consumed_per_process": [step * BATCH]}
        assert all(np.isfinite(v).all() for v in host_leaves(state["ema"]).values()), name
