"""Kill soak: SIGKILL a two-expert training run over and over; it must end bitwise equal.

Trains ``configs/demo.py:smoke`` (two experts trained together, frequent async checkpoints)
once without interruption (the reference) and once under fire: the trainer process itself (not
a wrapper shell) is started with the same command, killed with SIGKILL, and started again, until
it finishes. Kills are random (a uniform delay after the first progress line) or aimed at the
save window of a joint run (right after the log shows the first expert's save starting, when the
second expert has not committed yet). At the end the final raw and EMA parameters (and the
optimiser state, step and rng) of both experts must equal the reference's bitwise, and the
metrics file must parse with every step's losses present once and equal to the reference's.

  python benchmarks/kill_soak.py --random_kills=20 --aimed_kills=5 --steps=200  # CPU: ~35 min
  python benchmarks/kill_soak.py --smoke       # 2 aimed kills, a few minutes (the tests run it)

Prints one JSON object on stdout (kills tried/survived, bitwise equality, metrics check, times).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAVE_LINE = "Saving checkpoint step"


def train_command(workdir: pathlib.Path, steps: int, ckpt_every: int) -> list[str]:
    return [sys.executable, "-m", "pdm_jax.main", f"--config=configs/demo.py:smoke,steps={steps}",
            f"--workdir={workdir}", f"--config.ckpt.every={ckpt_every}", "--config.ckpt.keep=2",
            "--config.train.log_every=1"]


def child_env(cache_dir: str) -> dict[str, str]:
    """One device (the soak tests the saving, not the sharding), a shared compilation cache."""
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COMPILATION_CACHE_DIR=cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run_to_end(command: list[str], env: dict, log: pathlib.Path) -> None:
    with open(log, "a") as f:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {log}")


def start_trainer(command: list[str], env: dict, log: pathlib.Path
                  ) -> tuple[subprocess.Popen, int]:
    """Starts the trainer (the python process itself); returns it and where its log begins."""
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as f:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT), start


def wait_for(process: subprocess.Popen, log: pathlib.Path, start: int, pattern: str,
             timeout: float = 600.0) -> bool:
    """Polls ``log`` (from byte ``start``) until ``pattern`` appears (True) or the process ends
    (False)."""
    deadline = time.monotonic() + timeout
    while pattern not in log.read_text(errors="replace")[start:]:
        if process.poll() is not None:
            return pattern in log.read_text(errors="replace")[start:]
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"no {pattern!r} within {timeout:.0f} s; see {log}")
        time.sleep(0.02)
    return True


def kill(process: subprocess.Popen) -> None:
    """SIGKILL: no handler runs, no file is closed, no async save completes."""
    process.send_signal(signal.SIGKILL)
    process.wait()


def run_once_with_kill(command: list[str], env: dict, log: pathlib.Path, aimed: bool,
                       rng: random.Random, max_delay: float) -> str:
    """Starts the trainer; kills it (aimed at a save, or after a random delay) unless it ends
    first. Returns 'killed' or 'finished'."""
    process, start = start_trainer(command, env, log)
    try:
        if aimed:  # the first expert's save has just started; the second has not committed
            alive = wait_for(process, log, start, SAVE_LINE)
        else:
            alive = wait_for(process, log, start, "images/s")
            deadline = time.monotonic() + rng.uniform(0, max_delay)
            while alive and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        if process.poll() is None:
            kill(process)
            return "killed"
    finally:
        if process.poll() is None:
            kill(process)
    if process.returncode:
        raise RuntimeError(f"trainer failed ({process.returncode}) after a restart; see {log}")
    return "finished"


def compare(reference: pathlib.Path, victim: pathlib.Path) -> dict:
    """Final states bitwise, metrics complete, in this process (8 CPU devices are not needed)."""
    import jax
    import numpy as np

    from pdm_jax import checkpointing, config_lib, sharding, writers
    from pdm_jax.training.state import setup_experts

    config = config_lib.load_config(REPO / "configs" / "demo.py", "smoke")
    mesh = sharding.make_mesh((-1, 1))
    leaves, differing = 0, []
    for setup in setup_experts(config, mesh):
        states = []
        for workdir in (reference, victim):
            with checkpointing.Checkpointer(
                    checkpointing.expert_checkpoint_dir(str(workdir), setup.name),
                    signature=setup.signature) as ckpt:
                states.append(ckpt.restore(setup.abstract)[0])
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(states[0])[0],
                                jax.tree.leaves(states[1])):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            leaves += 1
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                differing.append(f"{setup.name}/{sharding.path_str(path)}")

    def losses(workdir):
        rows = [json.loads(line) for line in
                open(writers.metrics_path(str(workdir))).read().splitlines()]
        return {row["step"]: row["loss"] for row in rows if "loss" in row}, len(rows)

    ref_losses, _ = losses(reference)
    victim_losses, victim_records = losses(victim)  # json.loads of every line: none torn
    return {"tensors_compared": leaves, "tensors_differing": differing[:10],
            "bitwise_equal": not differing and leaves > 0,
            "metrics_records": victim_records,
            "steps_logged": sorted(victim_losses) == sorted(ref_losses),
            "losses_equal": victim_losses == ref_losses}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random_kills", type=int, default=20)
    parser.add_argument("--aimed_kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200,
                        help="enough that every kill lands before the run ends")
    parser.add_argument("--ckpt_every", type=int, default=2)
    parser.add_argument("--max_delay", type=float, default=4.0,
                        help="random kills: seconds after the first progress line, uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="keep the workdirs and logs here")
    parser.add_argument("--smoke", action="store_true", help="2 aimed kills, 8 steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.random_kills, args.aimed_kills, args.steps = 0, 2, 8
    root = pathlib.Path(args.out or tempfile.mkdtemp(prefix="kill_soak_"))
    root.mkdir(parents=True, exist_ok=True)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root / "xla_cache")
    env = child_env(cache)
    reference, victim = root / "reference", root / "victim"
    for path in (reference, victim):
        shutil.rmtree(path, ignore_errors=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    run_to_end(train_command(reference, args.steps, args.ckpt_every), env, root / "reference.log")
    reference_s = time.time() - t0
    plan = ["aimed"] * args.aimed_kills + ["random"] * args.random_kills
    rng.shuffle(plan)
    command = train_command(victim, args.steps, args.ckpt_every)
    kills, restarts_after_end = {"aimed": 0, "random": 0}, 0
    t0 = time.time()
    for kind in plan:
        outcome = run_once_with_kill(command, env, root / "victim.log", kind == "aimed", rng,
                                     args.max_delay)
        if outcome == "finished":  # the run ended before the kill: start over to go on firing
            restarts_after_end += 1
            break
        kills[kind] += 1
        print(f"{kind} kill {sum(kills.values())}/{len(plan)}", file=sys.stderr)
    run_to_end(command, env, root / "victim.log")  # resume to the end (a no-op if finished)
    result = {"steps": args.steps, "ckpt_every": args.ckpt_every, "kills_tried": len(plan),
              "kills": kills, "ended_before_all_kills": bool(restarts_after_end),
              "reference_s": round(reference_s, 1), "soak_s": round(time.time() - t0, 1),
              "workdir": str(root)}
    result.update(compare(reference, victim))
    result["survived"] = (sum(kills.values()) if result["bitwise_equal"]
                          and result["steps_logged"] and result["losses_equal"] else 0)
    print(json.dumps(result, indent=1))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
