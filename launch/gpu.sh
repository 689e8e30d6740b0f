#!/usr/bin/env bash
# Multi-node GPU training of pdm_jax: one JAX process per node, driving all of its GPUs.
#
# Usage: launch/gpu.sh [--dry-run] node|slurm
#
#   node    run THIS node's process (start it on every node, e.g. by hand, pdsh or a scheduler):
#           python -m pdm_jax.main ... --coordinator_address --num_processes --process_id.
#           Python writes LOG_DIR/process_<PROCESS_ID>.log itself (appended); the script
#           shows that log on the terminal too. A SIGTERM/SIGINT to the script is passed on
#           to python, and the script waits for it to save and exit.
#   slurm   inside a Slurm allocation (sbatch/salloc): srun one task per node, each running
#           "launch/gpu.sh node" with PROCESS_ID=$SLURM_PROCID; the first node coordinates.
#           Each task keeps every GPU of its node (pdm_jax.sharding passes them all to
#           jax.distributed). In the sbatch script, ask for the stop signal ahead of the time
#           limit so the last save fits: #SBATCH --signal=TERM@300 (Slurm's KillWait after a
#           plain scancel is 30 s by default; "scancel --signal=TERM JOBID" stops gracefully).
#
# --dry-run prints every variable it checked and every command it would run, runs nothing.
#
# Variables (environment):
#   CONFIG, WORKDIR          both: --config and --workdir (a directory every node sees: a
#                            shared filesystem or gs://)
#   EXTRA_ARGS               both (optional): more flags, e.g. "--config.mesh.shape=(-1,8)"
#   COORDINATOR_ADDRESS      node: host:port of process 0, reachable from every node
#                            slurm (optional): default <first node of the allocation>:PORT
#   NUM_PROCESSES            node: number of nodes (processes)
#   PROCESS_ID               node: this node's index, 0 .. NUM_PROCESSES-1
#   SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES   slurm: set by Slurm inside the allocation
#   PORT                     slurm (optional): coordinator port, default 61440 + SLURM_JOB_ID %
#                            4096 (a port per job, as JAX's own Slurm detection picks it)
#   LOG_DIR                  optional: default ./logs
#   PYTHON                   optional: default python
#
# Re-running the same command resumes from the latest checkpoint in WORKDIR.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

parse_command_line "$@"

require CONFIG "the config, e.g. configs/imagenet256.py"
require WORKDIR "the run directory, on storage every node sees (shared filesystem or gs://)"
EXTRA_ARGS=${EXTRA_ARGS:-}
LOG_DIR=${LOG_DIR:-logs}
PYTHON=${PYTHON:-python}
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# checked EXTRA_ARGS=$EXTRA_ARGS"
  echo "# checked LOG_DIR=$LOG_DIR"
  echo "# checked PYTHON=$PYTHON"
fi
read -r -a extra_words <<< "$EXTRA_ARGS"

check_int() {  # check_int NAME VALUE: a non-negative integer
  if ! [[ "$2" =~ ^[0-9]+$ ]]; then
    echo "error: $1=$2; expected a non-negative integer" >&2
    exit 2
  fi
}

case "$COMMAND" in
  node)
    require COORDINATOR_ADDRESS "host:port of process 0, reachable from every node"
    require NUM_PROCESSES "the number of nodes (one process each)"
    require PROCESS_ID "this node's index, 0 .. NUM_PROCESSES-1"
    if ! [[ "$COORDINATOR_ADDRESS" =~ ^[^:]+:[0-9]+$ ]]; then
      echo "error: COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS; expected host:port" >&2
      exit 2
    fi
    check_int NUM_PROCESSES "$NUM_PROCESSES"
    check_int PROCESS_ID "$PROCESS_ID"
    if (( NUM_PROCESSES < 1 || PROCESS_ID >= NUM_PROCESSES )); then
      echo "error: PROCESS_ID=$PROCESS_ID must lie in [0, NUM_PROCESSES=$NUM_PROCESSES)" >&2
      exit 2
    fi
    log="$LOG_DIR/process_${PROCESS_ID}.log"
    cmd=("$PYTHON" -m pdm_jax.main --config="$CONFIG" --workdir="$WORKDIR"
         --coordinator_address="$COORDINATOR_ADDRESS" --num_processes="$NUM_PROCESSES"
         --process_id="$PROCESS_ID" "${extra_words[@]}")
    run cd "$REPO_ROOT"
    run mkdir -p "$LOG_DIR"
    # Python writes its log itself (no pipe to tee, which would get the same SIGTERM and lose
    # the last lines of the final save); tail shows it here and ignores SIGTERM/SIGINT.
    plan "+ $(quote_args "${cmd[@]}") >> $(quote_args "$log") 2>&1 < /dev/null &"
    plan "# on SIGTERM/SIGINT: kill -TERM <python pid>, then wait for it to save and exit"
    if [[ "$DRY_RUN" == 0 ]]; then
      offset=$(( $(stat -c %s "$log" 2>/dev/null || echo 0) + 1 ))
      "${cmd[@]}" >> "$log" 2>&1 < /dev/null &
      pid=$!
      trap 'echo "gpu.sh: signal received: SIGTERM to python (pid $pid), waiting for it to exit" >&2
            kill -TERM "$pid" 2>/dev/null || true' TERM INT
      ( trap '' TERM INT; exec tail -c "+$offset" -F --pid="$pid" "$log" 2>/dev/null ) &
      tail_pid=$!
      # wait returns early (status > 128) when a trapped signal arrives: wait again until
      # python is gone, then read its exit status.
      status=0
      while kill -0 "$pid" 2>/dev/null; do wait "$pid" && status=0 || status=$?; done
      wait "$pid" 2>/dev/null && status=0 || status=$?
      wait "$tail_pid" 2>/dev/null || true
      echo "gpu.sh: python exited with status $status (log: $log)" >&2
      exit "$status"
    fi
    ;;
  slurm)
    require SLURM_JOB_ID "run inside a Slurm allocation (sbatch or salloc)"
    require SLURM_JOB_NODELIST "run inside a Slurm allocation (sbatch or salloc)"
    require SLURM_NNODES "run inside a Slurm allocation (sbatch or salloc)"
    check_int SLURM_JOB_ID "$SLURM_JOB_ID"
    # A port per job, so jobs that share a node do not collide (JAX's own choice under Slurm).
    PORT=${PORT:-$(( 61440 + SLURM_JOB_ID % 4096 ))}
    check_int PORT "$PORT"
    [[ "$DRY_RUN" == 1 ]] && echo "# checked PORT=$PORT"
    if [[ -z "${COORDINATOR_ADDRESS:-}" ]]; then
      # A read-only query, also under --dry-run: the first node of the allocation.
      if ! command -v scontrol > /dev/null; then
        echo "error: scontrol not found; set COORDINATOR_ADDRESS=host:port" >&2
        exit 2
      fi
      # All of the output, then its first line (head -n 1 in a pipe could SIGPIPE scontrol).
      hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
      COORDINATOR_ADDRESS="${hosts%%$'\n'*}:$PORT"
    fi
    [[ "$DRY_RUN" == 1 ]] && echo "# checked COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS"
    export CONFIG WORKDIR EXTRA_ARGS LOG_DIR PYTHON COORDINATOR_ADDRESS
    export NUM_PROCESSES="$SLURM_NNODES"
    # One task per node; every task sees all GPUs of its node (a step gets all of the job's
    # GPUs on the node) and pdm_jax.sharding keeps them all in the process. $SLURM_PROCID is
    # expanded by each task's shell, not here.
    run srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 \
      --kill-on-bad-exit=1 \
      bash -c "PROCESS_ID=\$SLURM_PROCID exec $(quote_args "$REPO_ROOT/launch/gpu.sh") node"
    ;;
  "")
    echo "error: no command given" >&2; usage >&2; exit 2 ;;
  *)
    echo "error: unknown command $COMMAND; expected node or slurm" >&2
    exit 2 ;;
esac
