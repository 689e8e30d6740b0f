"""Two JAX processes on loopback train like one process, checkpoint once, and restore on 4 devices.

Three real runs of ``python -m pdm_jax.main`` (a tiny single-expert U-Net on a 32-image folder,
global batch 16, seed 0, ``data.global_order=True``):

  * reference: ONE process with 8 virtual CPU devices, steps 1-6 (mesh data=8);
  * pair: TWO processes (jax.distributed on 127.0.0.1, gloo CPU collectives) with 4 devices
    each, steps 1-4, one checkpoint at step 4 (mesh data=8 over both processes);
  * resumed: ONE process with 4 devices restores the pair's step-4 checkpoint (mesh data=4)
    and trains steps 5-6.

Same global batch: by default every process reads its own shard of the data and shuffles it
with its own seed (tests/test_data_pipeline.py checks the shards are disjoint), so a 2-process
run sees DIFFERENT global batches than a 1-process run: same data, another order. With
``data.global_order=True`` every process reads the single-process stream and keeps the rows its
devices hold (sharding.global_batch(full=True)), so the three runs see identical global batches
and their losses must agree. Tolerance: rtol 1e-5; measured relative differences are at most
2e-7 (float32 rounding: the gradient all-reduce sums in another order across processes).

Cost: each run compiles its own train step (the device topology is part of the program); XLA's
CPU backend optimisation level 0 halves that and is used by all runs alike. A per-module
persistent XLA cache lets the two processes of the pair share what one of them compiled first.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERT = "snr_0_inf"  # the single expert's checkpoint sub-directory
PAIR_STEPS, TOTAL_STEPS = 4, 6
LOSS_RTOL = 1e-5
TIMEOUT_S = 900
# A smaller U-Net than the smoke one (one level, no attention): the point is the distributed
# machinery, and compiling three topologies of the train step is this file's main cost.
TINY = ("--config.model.model_channels=16", "--config.model.num_groups=8",
        "--config.model.channel_mult=(1,)", "--config.model.attention_resolutions=()",
        "--config.model.num_head_channels=16")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(devices: int, cache_dir: pathlib.Path) -> dict[str, str]:
    """A child environment with `devices` virtual CPU devices, set before JAX is imported."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                   "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"),
        JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        # gloo is JAX's default CPU collective implementation; named for clarity.
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    return env


def start(workdir, folder, num_steps: int, devices: int, cache_dir, log_path,
          distributed: tuple[str, int, int] | None = None,
          ckpt_every: int = PAIR_STEPS) -> subprocess.Popen:
    """Starts ``python -m pdm_jax.main`` training; stdout+stderr go to `log_path`."""
    cmd = [sys.executable, "-m", "pdm_jax.main", "--config=configs/demo.py:smoke,experts=1",
           f"--workdir={workdir}", "--config.data.name=folder", f"--config.data.folder={folder}",
           "--config.data.global_order=True", "--config.train.log_every=1",
           f"--config.train.num_steps={num_steps}", f"--config.ckpt.every={ckpt_every}", *TINY]
    if distributed:
        address, count, index = distributed
        cmd += [f"--coordinator_address={address}", f"--num_processes={count}",
                f"--process_id={index}"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(devices, cache_dir), stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    return proc


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, pathlib.Path]) -> None:
    """Waits for every process; on a failure or timeout kills the rest and shows the logs."""
    failed = []
    try:
        for name, proc in procs.items():
            if proc.wait(timeout=TIMEOUT_S) != 0:
                failed.append(name)
    except subprocess.TimeoutExpired:
        failed.append("timeout")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        tails = {n: logs[n].read_text()[-3000:] for n in procs}
        pytest.fail(f"runs {failed} failed:\n" + "\n".join(f"--- {n}:\n{t}"
                                                         for n, t in tails.items()))


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # rate records (steps/s, images/s) are separate
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate metric rows (two writers?): {steps}"
    return {r["step"]: r["loss"] for r in rows}


def tree_listing(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    rng = np.random.default_rng(0)
    folder = root / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(16):
            image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / label / f"{i:02d}.png")
    cache = root / "xla_cache"
    ref, pair = root / "reference", root / "pair"
    logs = {name: root / f"{name}.log" for name in ("reference", "pair0", "pair1", "resumed")}

    # The reference and the pair are independent: run them side by side.
    address = f"127.0.0.1:{free_port()}"
    # The reference only saves its last step (orbax writes cost seconds each here).
    procs = {"reference": start(ref, folder, TOTAL_STEPS, 8, cache, logs["reference"],
                                ckpt_every=TOTAL_STEPS)}
    for i in (0, 1):
        procs[f"pair{i}"] = start(pair, folder, PAIR_STEPS, 4, cache, logs[f"pair{i}"],
                                  distributed=(address, 2, i))
    wait_all(procs, logs)
    pair_ckpt_files = tree_listing(pair / "checkpoints")
    pair_losses = losses(pair)
    pair_workdir_files = sorted(p.name for p in pair.iterdir())

    resumed = start(pair, folder, TOTAL_STEPS, 4, cache, logs["resumed"])
    wait_all({"resumed": resumed}, logs)
    return dict(ref=ref, pair=pair, logs={n: p.read_text() for n, p in logs.items()},
                pair_ckpt_files=pair_ckpt_files, pair_losses=pair_losses,
                pair_workdir_files=pair_workdir_files, ref_losses=losses(ref),
                final_losses=losses(pair))


def test_each_process_initialises_jax_distributed_and_logs_its_index(runs):
    for i in (0, 1):
        log = runs["logs"][f"pair{i}"]
        assert f"JAX process {i} / 2; 4 local devices, 8 global devices" in log
        assert "Mesh {'data': 8, 'fsdp': 1} over 8 devices, 2 processes" in log
    assert "JAX process 0 / 1; 8 local devices, 8 global devices" in runs["logs"]["reference"]


def test_two_processes_give_the_losses_of_one_process_on_8_devices(runs):
    ref, pair = runs["ref_losses"], runs["pair_losses"]
    assert sorted(pair) == list(range(1, PAIR_STEPS + 1))
    assert sorted(ref) == list(range(1, TOTAL_STEPS + 1))
    got = np.array([pair[s] for s in sorted(pair)])
    want = np.array([ref[s] for s in sorted(pair)])
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
    # Not trivially equal: the losses change from step to step.
    assert len(set(np.round(want, 6))) == len(want)


def test_only_process_0_writes_metrics_and_the_checkpoint_is_written_once(runs):
    files = runs["pair_workdir_files"]
    assert files.count("metrics.jsonl") == 1 and "config.json" in files
    assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1, files
    listing = runs["pair_ckpt_files"]
    steps = sorted({p.split("/")[1] for p in listing if p.count("/") >= 1})
    assert steps == [str(PAIR_STEPS)], listing[:20]
    assert not [p for p in listing if "tmp" in p.split("/")[-1]], "unfinished orbax writes"
    # One finalised step: orbax's commit marker for the step and both items.
    for item in ("", "/state", "/meta"):
        marker = f"{EXPERT}/{PAIR_STEPS}{item}/commit_success.txt"
        assert marker in listing or f"{EXPERT}/{PAIR_STEPS}{item}/_CHECKPOINT_METADATA" in listing
    # Both processes took part in the collective save; neither saved twice.
    for i in (0, 1):
        log = runs["logs"][f"pair{i}"]
        assert log.count(f"Saving checkpoint step {PAIR_STEPS}") == 1


def test_one_process_with_4_devices_restores_the_checkpoint_and_continues(runs):
    log = runs["logs"]["resumed"]
    assert "JAX process 0 / 1; 4 local devices, 4 global devices" in log
    assert "Mesh {'data': 4, 'fsdp': 1} over 4 devices, 1 processes" in log
    assert f"resumed from step {PAIR_STEPS}" in log
    final = runs["final_losses"]
    assert sorted(final) == list(range(1, TOTAL_STEPS + 1))
    # Steps 1-4 are the pair's rows; 5-6 continue the same data stream on the new topology.
    later = range(PAIR_STEPS + 1, TOTAL_STEPS + 1)
    np.testing.assert_allclose([final[s] for s in later], [runs["ref_losses"][s] for s in later],
                               rtol=LOSS_RTOL)
    steps = sorted(p.name for p in (runs["pair"] / "checkpoints" / EXPERT).iterdir())
    assert steps == [str(PAIR_STEPS), str(TOTAL_STEPS)]


#### Start-up from the environment (no processes started: jax.distributed is recorded) ####


@pytest.fixture
def recorded_initialize(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # not a Cloud TPU VM
    return calls


def test_plain_per_node_launch_is_read_from_the_environment(recorded_initialize, monkeypatch):
    from pdm_jax import distributed

    distributed.maybe_initialize_distributed()
    assert recorded_initialize == []  # a single process stays as it is
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:12355")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    distributed.maybe_initialize_distributed()
    # JAX reads the address itself; the count and index come from the variables.
    assert recorded_initialize == [dict(coordinator_address=None, num_processes=4,
                                        process_id=3)]
    distributed.maybe_initialize_distributed("10.0.0.1:1234", 2, 0)  # flags win
    assert recorded_initialize[-1] == dict(coordinator_address="10.0.0.1:1234",
                                           num_processes=2, process_id=0)


def test_bad_process_count_in_the_environment_is_named(recorded_initialize, monkeypatch):
    from pdm_jax import distributed

    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' must be a non-negative"):
        distributed.maybe_initialize_distributed()
    assert recorded_initialize == []
