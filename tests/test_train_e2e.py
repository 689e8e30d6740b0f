"""End to end on 8 virtual CPU devices (mesh data=8): train, resume, kill, stop, sample.

Every run uses ``configs/demo.py:smoke``: a two-expert ensemble of tiny U-Nets (16x16, 8
classes, batch 16; patch 2 for SNR > 0.25, patch 4 below) trained together on a 16-image
folder, and changes only host-side settings (step counts, checkpoint interval), so every run
lowers the SAME train step, which the session's persistent XLA cache compiles once. The
reference is the session's trained run (conftest.trained_run: 30 steps, checkpoints at 10, 20,
30); resumed, killed and stopped runs must end bitwise equal to it.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import REPO, TRAINED_CKPTS, TRAINED_STEPS, demo_config, folder_config
from pdm_jax import checkpointing, sharding, writers
from pdm_jax.data import pipeline
from pdm_jax.diffusion.schedules import Schedule
from pdm_jax.jobs import sample, train
from pdm_jax.training import state as state_lib
from pdm_jax.training.step import NonFiniteLossError, jit_train_step

BATCH = 16  # the smoke config's global batch

# Shares the session's trained run with test_export.py (one worker trains it once).
pytestmark = pytest.mark.xdist_group("trained_run")


def tfds_config(data_dir, *, num_steps: int, ckpt_every: int):
    """The smoke config on tfds colorectal_histology (8 classes, like the smoke model)."""
    c = demo_config("smoke")
    c.data.update(name="colorectal_histology", data_dir=str(data_dir), class_conditional=True,
                  cache=False)
    c.train.num_steps, c.ckpt.every = num_steps, ckpt_every
    return c


def mock_tfds(data_dir, num_examples: int):
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


#### Copies of the trained run ####


def resumable_copy(trained_run, root, step: int):
    """A copy of the trained run as a run killed after checkpoint ``step`` would leave it: its
    later checkpoints gone, its metrics file still holding the later steps' records."""
    workdir = root / f"at_{step}"
    shutil.copytree(trained_run.workdir, workdir, ignore=shutil.ignore_patterns("samples"))
    for name in EXPERTS:
        for later in TRAINED_CKPTS:
            if later > step:
                shutil.rmtree(workdir / "checkpoints" / name / str(later))
    return workdir


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
    assert checkpoint_steps(workdir) == {name: list(TRAINED_CKPTS) for name in EXPERTS}
    for name, state in trained_run.state.items():
        assert int(state["step"]) == TRAINED_STEPS
        assert all(np.isfinite(v).all() for v in host_leaves(state["params"]).values()), name
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["folder"] == trained_run.config.data.folder
    assert os.listdir(workdir / "leases") == []  # released at the end


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
def test_resume_from_checkpoint_is_bitwise_identical_to_an_uninterrupted_run(trained_run,
                                                                             tmp_path):
    """The run as a kill after step 10 leaves it, resumed by the same call, ends where the
    uninterrupted run ended: every parameter, EMA, Adam moment, step and rng, and every loss."""
    workdir = resumable_copy(trained_run, tmp_path, TRAINED_CKPTS[0])
    stale = len(loss_rows(workdir))
    resumed = host_leaves(train.run(trained_run.config, str(workdir)))
    straight = host_leaves(trained_run.state)
    assert resumed.keys() == straight.keys()
    for name in EXPERTS:
        assert int(resumed[f"{name}/step"]) == TRAINED_STEPS
    for key in resumed:  # per expert: params, ema, opt_state (Adam moments, count), step, rng
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    # Same batches after the resume: the records of steps 12-30 that the killed run had logged
    # were dropped and logged again, once each, with the same losses.
    rows = loss_rows(workdir)
    assert stale == len(rows) == TRAINED_STEPS // 2
    assert rows == loss_rows(trained_run.workdir)
    assert checkpoint_steps(workdir) == {name: list(TRAINED_CKPTS) for name in EXPERTS}


#### 5. Non-finite loss ####


@pytest.mark.slow
def test_non_finite_loss_stops_without_checkpointing_the_bad_step(trained_run, tmp_path,
                                                                  monkeypatch):
    """Resumes the step-10 copy; the 1st batch is clean, from the 2nd on the images are NaN.

    NaN inputs make the loss and gradients NaN inside the unchanged (cached) train step. With
    ckpt.every=1, step 11 is saved; step 12 must raise and save nothing.
    """
    start = TRAINED_CKPTS[0]
    workdir = resumable_copy(trained_run, tmp_path, start)
    real_iterate = pipeline.iterate_numpy

    def poisoned(ds):
        for i, batch in enumerate(real_iterate(ds)):
            if i >= 1:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    monkeypatch.setattr(pipeline, "iterate_numpy", poisoned)
    config = folder_config(trained_run.folder, num_steps=100, ckpt_every=1)
    with pytest.raises(NonFiniteLossError,
                       match=rf"at step {start + 2} \(loss=nan\); the state was kept at step "
                             rf"{start + 1}"):
        train.run(config, str(workdir))
    assert checkpoint_steps(workdir) == {name: [start, start + 1] for name in EXPERTS}
    for name, (state, meta) in restore_states(config, workdir).items():
        assert int(state["step"]) == start + 1, name
        assert meta["data_position"] == {"records_consumed_per_process": [(start + 1) * BATCH]}
        assert all(np.isfinite(v).all() for v in host_leaves(state).values()), name


#### 6. Sampling ####


@pytest.mark.slow
def test_sample_writes_npz_with_balanced_labels_and_a_png_grid(trained_run):
    config = trained_run.config.copy_and_resolve_references()
    config.sample.update(num_samples=20, batch_size=16, name="e2e")  # 2 batches, the last cut
    path = sample.run(config, str(trained_run.workdir))
    assert path == os.path.join(str(trained_run.workdir), "samples", "e2e.npz")
    with np.load(path) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 3)
    np.testing.assert_array_equal(labels, np.arange(20) % 6)
    # The PNG tiles the same images a class per column: 6 columns x 4 rows of 16 px with 2 px
    # padding, upscaled 4x (nearest): 512 // 110.
    with Image.open(trained_run.workdir / "samples" / "e2e.png") as png:
        assert png.format == "PNG" and png.size == (4 * (6 * 18 + 2), 4 * (4 * 18 + 2))
        grid = np.asarray(png.convert("RGB"))[::4, ::4]
    for i in (0, 7, 19):
        row, col = divmod(i, 6)
        assert col == labels[i]
        np.testing.assert_array_equal(
            grid[2 + 18 * row:18 + 18 * row, 2 + 18 * col:18 + 18 * col], images[i])


#### 4. Kills, SIGTERM, a second trainer ####


def load_soak_module():
    """benchmarks/kill_soak.py, whose trainer helpers (start, wait for a log line, SIGKILL the
    python process itself) this test shares."""
    spec = importlib.util.spec_from_file_location("kill_soak", REPO / "benchmarks" / "kill_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_kill_in_the_save_window_sigterm_and_a_second_trainer(tmp_path, trained_run):
    """``python -m pdm_jax.main`` to step 30 (checkpoint every 2 steps), as a user would live it:

    1. SIGKILL the trainer as soon as it logs the first expert's save of step 4: the second
       expert's step 4 is not committed (the window that once made joint runs unresumable).
    2. The same command resumes (the dead holder's lease is taken over at once); while it runs,
       a second trainer on the workdir is refused, naming the holder.
    3. SIGTERM: the trainer saves the current step and exits 0.
    4. The same command finishes the run: every tensor equals the uninterrupted run's, and the
       metrics file parses with each step's losses once, equal to its.
    """
    soak = load_soak_module()
    workdir, log = tmp_path / "run", tmp_path / "train.log"
    command = [sys.executable, "-m", "pdm_jax.main",
               f"--config=configs/demo.py:smoke,steps={TRAINED_STEPS}",
               f"--workdir={workdir}", "--config.ckpt.every=2", "--config.train.log_every=1",
               "--config.data.name=folder", f"--config.data.folder={trained_run.folder}"]
    # Same devices, numerics and session XLA cache as this process: nothing compiles again.
    env = dict(os.environ)

    first, start = soak.start_trainer(command, env, log)
    assert soak.wait_for(first, log, start, f"Saving checkpoint step 4 to {workdir}/checkpoints/"
                                            f"{EXPERTS[0]}")
    soak.kill(first)

    second, start = soak.start_trainer(command, env, log)
    assert soak.wait_for(second, log, start, "Taking over the stale lease")
    rival = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rival.returncode != 0
    assert f"pid {second.pid}" in rival.stderr and "held by a live run" in rival.stderr
    assert soak.wait_for(second, log, start, "images/s"), log.read_text()[-3000:]
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
    stopped = log.read_text()[start:]
    assert "resumed from step" in stopped and "Stop requested" in stopped
    # The time to the first step, logged in the form benchmarks/startup_time.py reads.
    spec = importlib.util.spec_from_file_location("startup_time",
                                                  REPO / "benchmarks" / "startup_time.py")
    startup_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup_time)
    first_step = startup_time._FIRST.search(stopped)
    assert first_step, stopped[-3000:]
    total, setup, compile_and_step = map(float, first_step.groups())
    assert total == pytest.approx(setup + compile_and_step, abs=0.15) and setup > 0

    soak.run_to_end(command, env, log)
    same = soak.compare(trained_run.workdir, workdir)  # every tensor of both experts' states
    assert same["bitwise_equal"] and same["tensors_compared"] > 500, same
    rows = loss_rows(workdir)  # every line parses
    losses = {r["step"]: r["loss"] for r in rows}
    assert sorted(r["step"] for r in rows) == list(range(1, TRAINED_STEPS + 1))  # each once
    # The reference logged every 2nd step the float32 mean of two steps' losses.
    for row in loss_rows(trained_run.workdir):
        pair = np.asarray([losses[row["step"] - 1], losses[row["step"]]], np.float32)
        assert float(np.mean(pair)) == row["loss"], row["step"]
    assert os.listdir(workdir / "leases") == []
