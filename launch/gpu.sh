#!/usr/bin/env bash
# Multi-node GPU training of pdm_jax: one JAX process per node, driving all of its GPUs.
#
# Usage: launch/gpu.sh [--dry-run] node|slurm
#
#   node    run THIS node's process (start it on every node, e.g. by hand, pdsh or a scheduler):
#           python -m pdm_jax.main ... --coordinator_address --num_processes --process_id,
#           logging to LOG_DIR/process_<PROCESS_ID>.log as well as the terminal
#   slurm   inside a Slurm allocation (sbatch/salloc): srun one task per node, each running
#           "launch/gpu.sh node" with PROCESS_ID=$SLURM_PROCID; the first node coordinates
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
#   SLURM_JOB_NODELIST, SLURM_NNODES   slurm: set by Slurm inside the allocation
#   PORT                     slurm (optional): coordinator port, default 12355
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
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "+ $(quote_args "${cmd[@]}") 2>&1 | tee -a $(quote_args "$log")"
    else
      echo "+ $(quote_args "${cmd[@]}") 2>&1 | tee -a $(quote_args "$log")" >&2
      "${cmd[@]}" 2>&1 | tee -a "$log"
    fi
    ;;
  slurm)
    require SLURM_JOB_NODELIST "run inside a Slurm allocation (sbatch or salloc)"
    require SLURM_NNODES "run inside a Slurm allocation (sbatch or salloc)"
    PORT=${PORT:-12355}
    check_int PORT "$PORT"
    if [[ -z "${COORDINATOR_ADDRESS:-}" ]]; then
      # A read-only query, also under --dry-run: the first node of the allocation.
      if ! command -v scontrol > /dev/null; then
        echo "error: scontrol not found; set COORDINATOR_ADDRESS=host:port" >&2
        exit 2
      fi
      COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$PORT"
    fi
    [[ "$DRY_RUN" == 1 ]] && echo "# checked COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS"
    export CONFIG WORKDIR EXTRA_ARGS LOG_DIR PYTHON COORDINATOR_ADDRESS
    export NUM_PROCESSES="$SLURM_NNODES"
    # One task per node; every task sees all GPUs of its node. $SLURM_PROCID is expanded by
    # each task's shell, not here.
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
