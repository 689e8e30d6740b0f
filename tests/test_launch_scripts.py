"""launch/*.sh: valid bash, --dry-run prints the commands, missing variables fail clearly.

No gcloud, srun or GPU is needed: --dry-run runs nothing and prints each command ("+ ...")
and each variable it checked ("# checked NAME=value").
"""

import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

TPU_ENV = dict(PROJECT="my-project", ZONE="us-central2-b", TPU_NAME="pdm-v4-32",
               ACCELERATOR_TYPE="v4-32", RUNTIME_VERSION="tpu-ubuntu2204-base",
               REPO_URL="https://github.com/example/pdm_jax.git",
               CONFIG="configs/imagenet256.py:expert=0", WORKDIR="gs://my-bucket/runs/in256")
GPU_ENV = dict(CONFIG="configs/imagenet256.py", WORKDIR="/shared/runs/in256",
               COORDINATOR_ADDRESS="node0:12355", NUM_PROCESSES="4", PROCESS_ID="3")
# Variables a developer's shell might carry into the test.
_SCRUB = set(TPU_ENV) | set(GPU_ENV) | {"PROVISIONING", "EXTRA_ARGS", "WORKER", "GIT_REF",
                                        "SLURM_JOB_NODELIST", "SLURM_NNODES", "PORT"}


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    full_env.update(env)
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


def commands(out: str) -> list[list[str]]:
    """The printed '+ ...' command lines, split as a shell would (the pipe to tee excluded)."""
    return [shlex.split(line[2:].split(" 2>&1 | ")[0])
            for line in out.splitlines() if line.startswith("+ ")]


def checked(out: str) -> dict[str, str]:
    return dict(line[len("# checked "):].split("=", 1)
                for line in out.splitlines() if line.startswith("# checked "))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_with_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in script.read_text() or script.name == "common.sh"


def test_tpu_run_starts_the_same_command_on_all_workers_with_a_log_per_worker():
    result = launch("tpu.sh", "--dry-run", "run", **TPU_ENV,
                    EXTRA_ARGS="--config.mesh.shape=(-1,4) --config.train.batch_size=256")
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and cmd[5] == "pdm-v4-32"
    assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd
    assert "--project=my-project" in cmd
    remote = next(a for a in cmd if a.startswith("--command="))[len("--command="):]
    assert "train_$(hostname).log" in remote
    # The remote shell sees `PDM_JAX_CLOUD_TPU=1 nohup python -m pdm_jax.main ...` with its
    # arguments intact: the variable tells the trainer to start jax.distributed (sharding.py).
    start_line = remote.split(" >> ")[0].rsplit("; ", 1)[1]
    env_word, nohup, *words = shlex.split(start_line)
    assert (env_word, nohup) == ("PDM_JAX_CLOUD_TPU=1", "nohup"), start_line
    assert words[0].endswith("/bin/python") and words[1:3] == ["-m", "pdm_jax.main"]
    assert "--config=configs/imagenet256.py:expert=0" in words
    assert "--workdir=gs://my-bucket/runs/in256" in words
    assert words[-2:] == ["--config.mesh.shape=(-1,4)", "--config.train.batch_size=256"]
    assert checked(result.stdout)["WORKDIR"] == "gs://my-bucket/runs/in256"
    assert set(checked(result.stdout)) >= {"PROJECT", "ZONE", "TPU_NAME", "CONFIG", "WORKDIR"}


@pytest.mark.parametrize("provisioning,expected", [
    ("on-demand", ["tpu-vm", "create", "pdm-v4-32"]),
    ("spot", ["tpu-vm", "create", "pdm-v4-32", "--spot"]),
    ("queued", ["queued-resources", "create", "pdm-v4-32-qr", "--node-id=pdm-v4-32"]),
    ("queued-spot", ["queued-resources", "create", "pdm-v4-32-qr", "--spot"]),
])
def test_tpu_create_on_demand_spot_and_queued(provisioning, expected):
    result = launch("tpu.sh", "create", "--dry-run", PROVISIONING=provisioning, **TPU_ENV)
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert cmd[:3] == ["gcloud", "compute", "tpus"]
    assert all(word in cmd for word in expected), cmd
    assert "--accelerator-type=v4-32" in cmd
    assert ("--spot" in cmd) == provisioning.endswith("spot")


@pytest.mark.parametrize("command,worker,must_contain", [
    ("setup", "all", ["git clone https://github.com/example/pdm_jax.git", "requirements.txt",
                      "jax[tpu]=="]),
    ("stop", "all", ["kill -TERM"]),
    ("tail", "0", ["tail -n 200 -F"]),
])
def test_tpu_setup_stop_and_tail_run_on_the_right_workers(command, worker, must_contain):
    result = launch("tpu.sh", "--dry-run", command, **TPU_ENV)
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert f"--worker={worker}" in cmd
    remote = next(a for a in cmd if a.startswith("--command="))
    for text in must_contain:
        assert text in remote


def test_tpu_delete_removes_the_queued_resource_or_the_vm():
    vm = commands(launch("tpu.sh", "--dry-run", "delete", **TPU_ENV).stdout)
    assert vm == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "pdm-v4-32",
                   "--zone=us-central2-b", "--project=my-project", "--quiet"]]
    queued = commands(launch("tpu.sh", "--dry-run", "delete", PROVISIONING="queued",
                             **TPU_ENV).stdout)
    assert queued[0][3:6] == ["queued-resources", "delete", "pdm-v4-32-qr"]
    assert "--force" in queued[0]


@pytest.mark.parametrize("command,missing", [
    ("run", "WORKDIR"), ("run", "CONFIG"), ("run", "TPU_NAME"), ("run", "PROJECT"),
    ("create", "ACCELERATOR_TYPE"), ("create", "ZONE"), ("setup", "REPO_URL"),
])
def test_tpu_missing_variable_fails_before_any_command(command, missing):
    env = {k: v for k, v in TPU_ENV.items() if k != missing}
    result = launch("tpu.sh", "--dry-run", command, **env)
    assert result.returncode != 0
    assert f"variable {missing} is not set" in result.stderr
    assert not commands(result.stdout)


def test_tpu_rejects_unknown_commands_and_provisioning():
    result = launch("tpu.sh", "--dry-run", "launch", **TPU_ENV)
    assert result.returncode != 0 and "unknown command launch" in result.stderr
    result = launch("tpu.sh", "--dry-run", "create", PROVISIONING="cheap", **TPU_ENV)
    assert result.returncode != 0 and "PROVISIONING=cheap" in result.stderr


def test_gpu_node_passes_the_distributed_flags_and_logs_per_process():
    result = launch("gpu.sh", "--dry-run", "node", **GPU_ENV, EXTRA_ARGS="--config.seed=1")
    assert result.returncode == 0, result.stderr
    cmd = commands(result.stdout)[-1]
    assert cmd[1:3] == ["-m", "pdm_jax.main"]
    assert {"--config=configs/imagenet256.py", "--workdir=/shared/runs/in256",
            "--coordinator_address=node0:12355", "--num_processes=4", "--process_id=3",
            "--config.seed=1"} <= set(cmd)
    assert "tee -a logs/process_3.log" in result.stdout
    assert checked(result.stdout)["NUM_PROCESSES"] == "4"


def test_gpu_slurm_sruns_one_task_per_node():
    result = launch("gpu.sh", "--dry-run", "slurm", CONFIG="configs/demo.py", WORKDIR="/w",
                    SLURM_JOB_NODELIST="gpu[01-04]", SLURM_NNODES="4",
                    COORDINATOR_ADDRESS="gpu01:12355")
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd and "--nodes=4" in cmd
    assert cmd[-1].startswith("PROCESS_ID=$SLURM_PROCID exec ") and cmd[-1].endswith(" node")


@pytest.mark.parametrize("missing", ["COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID",
                                     "CONFIG", "WORKDIR"])
def test_gpu_missing_variable_fails_before_any_command(missing):
    env = {k: v for k, v in GPU_ENV.items() if k != missing}
    result = launch("gpu.sh", "--dry-run", "node", **env)
    assert result.returncode != 0
    assert f"variable {missing} is not set" in result.stderr
    assert not commands(result.stdout)


@pytest.mark.parametrize("override,message", [
    (dict(PROCESS_ID="4"), "PROCESS_ID=4 must lie in [0, NUM_PROCESSES=4)"),
    (dict(NUM_PROCESSES="two"), "NUM_PROCESSES=two; expected a non-negative integer"),
    (dict(COORDINATOR_ADDRESS="node0"), "COORDINATOR_ADDRESS=node0; expected host:port"),
])
def test_gpu_bad_values_fail_with_the_bad_value_named(override, message):
    result = launch("gpu.sh", "--dry-run", "node", **{**GPU_ENV, **override})
    assert result.returncode != 0 and message in result.stderr
