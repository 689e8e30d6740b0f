"""A long run's safety nets: workdir leases, metrics that survive kills, modes that read the run.

Leases (pdm_jax/training/lease.py) and the metrics file repair (pdm_jax/writers.py) are tested
directly; "the other modes take the run's sections" end to end, on a workdir whose architecture
was chosen by command-line overrides (checkpointed random weights: no training compile).
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, demo_config, write_random_run
from pdm_jax import config_lib, io as io_lib, writers
from pdm_jax.training import lease as lease_lib


def write_lease(workdir, name, **fields):
    record = dict(run="someone-else", host=socket.gethostname(), pid=os.getpid(),
                  started=time.time() - 60, heartbeat=time.time(), command="python -m x")
    record.update(fields)
    io_lib.write_atomic(workdir / "leases" / f"{name}.json", json.dumps(record))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


#### Leases ####


def test_a_live_run_refuses_a_second_trainer_naming_the_holder(tmp_path):
    with lease_lib.Lease(str(tmp_path), ["snr_0_0.25", "snr_0.25_inf"]):
        held = json.loads((tmp_path / "leases" / "snr_0_0.25.json").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(lease_lib.WorkdirBusyError,
                           match=rf"snr_0.25_inf.json is held by a live run \(host "
                                 rf"{socket.gethostname()}, pid {os.getpid()}, started .* "
                                 rf"--config.train.take_over=True"):
            lease_lib.Lease(str(tmp_path), ["snr_0.25_inf"]).acquire()
        # Another expert of the same workdir is another run's business.
        with lease_lib.Lease(str(tmp_path), ["snr_0_1"]):
            pass
    assert os.listdir(tmp_path / "leases") == []  # released on exit
    with lease_lib.Lease(str(tmp_path), ["snr_0.25_inf"]):
        pass


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    write_lease(tmp_path, "e", pid=dead_pid())  # killed -9: its heartbeat is still fresh
    with lease_lib.Lease(str(tmp_path), ["e"]):
        assert json.loads((tmp_path / "leases" / "e.json").read_text())["pid"] == os.getpid()
    assert "Taking over the stale lease" in caplog.text


def test_a_silent_holder_on_another_host_expires_and_take_over_overrides(tmp_path):
    write_lease(tmp_path, "e", host="tpu-worker-7", pid=1)
    with pytest.raises(lease_lib.WorkdirBusyError, match="host tpu-worker-7, pid 1"):
        lease_lib.Lease(str(tmp_path), ["e"]).acquire()
    with lease_lib.Lease(str(tmp_path), ["e"], take_over=True):
        pass
    write_lease(tmp_path, "e", host="tpu-worker-7", pid=1,
                heartbeat=time.time() - lease_lib.EXPIRY_S - 1)  # a lost VM
    with lease_lib.Lease(str(tmp_path), ["e"]):
        pass


def test_a_run_whose_lease_was_taken_notices_and_leaves_it_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_lib, "HEARTBEAT_S", 0.05)
    lease = lease_lib.Lease(str(tmp_path), ["e"])
    lease.acquire()
    write_lease(tmp_path, "e", run="the-new-owner")  # e.g. --config.train.take_over=True
    assert lease.lost.wait(timeout=10)
    lease.release()
    assert json.loads((tmp_path / "leases" / "e.json").read_text())["run"] == "the-new-owner"


#### Metrics that survive kills ####


def test_repair_drops_a_torn_line_and_the_records_after_the_resume_step(tmp_path):
    """The file a kill left: a half-written step-16 line with the next run's step-17 record
    glued onto it (json.loads fails on it), then records logged after the last checkpoint."""
    path = tmp_path / "metrics.jsonl"
    good = [{"step": s, "loss": 1.0 / s} for s in range(1, 16)]
    torn = '{"step": 16, "loss": 0.06' + json.dumps({"step": 17, "loss": 0.05})
    later = [{"step": s, "loss": 0.0} for s in (18, 19)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + torn + "\n" +
                    "".join(json.dumps(r) + "\n" for r in later) + '{"step": 20, "lo')
    assert writers.repair_jsonl(str(path), keep_through_step=18) == 3  # torn x2, step 19
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == good + later[:1]
    assert writers.repair_jsonl(str(path), keep_through_step=18) == 0  # nothing left to do
    assert writers.repair_jsonl(str(tmp_path / "absent.jsonl")) == 0


def test_records_are_whole_lines_on_disk_after_each_write(tmp_path):
    writer = writers.JsonlWriter(str(tmp_path / "m.jsonl"))
    writer.write_scalars(3, {"loss": np.float32(0.5), "lr": 1e-3})
    # Flushed at once: another process (or a post-mortem) reads the record while this one lives.
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 3, "loss": 0.5,
                                                               "lr": 1e-3}
    assert (tmp_path / "m.jsonl").read_text().endswith("\n")
    writer.close()


#### Other modes read the run's config ####


def test_run_sections_come_from_the_run_unless_overridden():
    run = demo_config("smoke,experts=1")
    run.model.patch_size, run.data.folder, run.data.name = 4, "/data/x", "folder"
    command_line = demo_config("smoke")  # two experts, patch 2
    merged = config_lib.with_run_sections(command_line, run, {})
    assert merged.model.patch_size == 4 and list(merged.experts) == []
    assert (merged.data.name, merged.data.folder) == ("folder", "/data/x")
    assert merged.sample.to_dict() == command_line.sample.to_dict()  # not a run section
    merged = config_lib.with_run_sections(command_line, run, {"model.patch_size": 1,
                                                              "sample.steps": "9"})
    assert merged.model.patch_size == 1 and merged.sample.steps == "5"  # overrides win
    assert config_lib.dotted_differences({"model": {"patch_size": 4, "c": [1, 2]}},
                                         {"model": {"patch_size": 2, "c": [1, 2]}}) == [
        "model.patch_size: 4 vs 2"]


@pytest.fixture(scope="module")
def overridden_run(tmp_path_factory):
    """A workdir 'trained' with --config.model.patch_size=4 --config.model.model_channels=16
    --config.model.num_groups=8 on configs/demo.py:smoke,experts=1: its config.json and a
    checkpoint of random weights (the architecture is what matters here)."""
    workdir = tmp_path_factory.mktemp("overridden")
    config = demo_config("smoke,experts=1")
    config.model.update(patch_size=4, model_channels=16, num_groups=8, num_head_channels=16)
    write_random_run(workdir, config, step=3)
    return workdir


@pytest.mark.slow
def test_sample_mode_reads_the_architecture_from_the_workdir(overridden_run):
    """--mode=sample with the config file alone: the run's overrides come from config.json; an
    override that contradicts the checkpoint is refused naming the dotted key."""
    command = [sys.executable, "-m", "pdm_jax.main", "--config=configs/demo.py:smoke,experts=1",
               f"--workdir={overridden_run}", "--mode=sample", "--config.sample.num_samples=8",
               "--config.sample.batch_size=8", "--config.sample.name=plain"]
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Using the data/model/diffusion/experts sections" in proc.stderr
    with np.load(overridden_run / "samples" / "plain.npz") as data:
        assert data["arr_0"].shape == (8, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    wrong = subprocess.run(command + ["--config.model.patch_size=2"], cwd=REPO,
                           env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0
    assert "written for another architecture" in wrong.stderr
    assert "model.patch_size: 4 vs 2" in wrong.stderr
