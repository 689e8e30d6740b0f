"""Time from launching a training command to its first finished step, cold and warm cache.

Runs ``python -m pdm_jax.main --mode=train`` on a config (default: the demo) in a fresh
workdir, twice: first with an empty XLA compilation cache (cold: every program compiles), then
with the cache the first run filled (warm: what every later run or resume on this machine
sees). Each run is stopped once its "First step done" line appears. Prints JSON: per run the
seconds from launch to that line (imports included) and the job's own split into set-up and
compile + first step.

  python benchmarks/startup_time.py [--config=configs/demo.py] [--cache_dir=DIR]

Measure on an idle machine (the JSON carries the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
_FIRST = re.compile(r"First step done ([\d.]+) s after train started: ([\d.]+) s set-up .*?"
                    r"([\d.]+) s compiling")


def first_step(config: str, workdir: str, cache_dir: str, timeout: float) -> dict:
    """Launches one training run and stops it after its first step.

    Args:
      config: the --config argument.
      workdir: a fresh directory for the run.
      cache_dir: the XLA compilation cache directory to use.
      timeout: seconds before giving up.

    Returns:
      seconds from launch to the first step's log line, and the job's own split.
    """
    cmd = [sys.executable, "-m", "pdm_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--jax_compilation_cache_dir={cache_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            match = _FIRST.search(line)
            if match:
                return {"launch_to_first_step_s": time.perf_counter() - start,
                        "train_to_first_step_s": float(match.group(1)),
                        "setup_s": float(match.group(2)),
                        "compile_and_first_step_s": float(match.group(3))}
            if time.perf_counter() - start > timeout:
                break
        raise RuntimeError(f"{' '.join(cmd)} logged no first step; its last lines:\n"
                           + "".join(lines[-20:]))
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--cache_dir", default="", help="default: a new temporary directory")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or os.path.join(tmp, "xla_cache")
        runs = {}
        for name in ("cold", "warm"):
            runs[name] = first_step(args.config, os.path.join(tmp, name), cache, args.timeout)
            print(name, json.dumps(runs[name]), file=sys.stderr)
        cached = sum(1 for _ in pathlib.Path(cache).rglob("*") if _.is_file())
    out = {"config": args.config, "cpu_count": os.cpu_count(), "cache_entries": cached,
           "load_average_before": load_before, "load_average_after": os.getloadavg(), **runs}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
