#!/usr/bin/env bash
# Cloud TPU VM slices (single- or multi-host) for pdm_jax: create, setup, run, tail, stop, delete.
#
# Usage: launch/tpu.sh [--dry-run] COMMAND
#
#   create   create the slice: on-demand, spot, or through a queued resource (PROVISIONING)
#   status   describe the slice (and its queued resource)
#   setup    on ALL workers: clone/update the repository, make a venv, install the
#            requirements and jax[tpu] matching the installed jax
#   run      on ALL workers: start the SAME training command with nohup, one log file per
#            worker (~/pdm_jax_logs/train_<hostname>.log); relaunching it after a preemption
#            resumes from the latest checkpoint in WORKDIR
#   tail     follow the log of one worker (WORKER, default 0)
#   stop     on ALL workers: SIGTERM the training process (it saves a checkpoint, then exits)
#   delete   delete the slice (and its queued resource)
#
# --dry-run prints every variable it checked and every command it would run, runs nothing.
#
# Variables (environment):
#   PROJECT, ZONE, TPU_NAME      all commands
#   ACCELERATOR_TYPE             create: v4-32, v5litepod-64, v5p-128, ...
#   RUNTIME_VERSION              create: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e),
#                                v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
#   PROVISIONING                 create/status/delete: on-demand (default) | spot | queued |
#                                queued-spot (queued resources wait for capacity)
#   REPO_URL, GIT_REF            setup: repository to clone and the branch/tag/commit (main)
#   CONFIG, WORKDIR              run: --config and --workdir (a gs:// bucket every worker sees)
#   EXTRA_ARGS                   run (optional): more flags, e.g. "--config.mesh.shape=(-1,4)"
#   WORKER                       tail (optional): worker index, default 0
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

REMOTE_REPO='~/pdm_jax'          # expanded by the workers' shells
REMOTE_VENV='~/pdm_jax_venv'
REMOTE_LOGS='~/pdm_jax_logs'
PYTHON_VERSION=python3.11        # jax 0.10 needs Python >= 3.11; Ubuntu 22.04 images have 3.10

parse_command_line "$@"

require PROJECT "the Google Cloud project id"
require ZONE "the zone of the slice, e.g. us-central2-b (v4) or us-west4-a (v5e)"
require TPU_NAME "the name of the TPU VM slice"
PROVISIONING=${PROVISIONING:-on-demand}
case "$PROVISIONING" in
  on-demand|spot|queued|queued-spot) ;;
  *) echo "error: PROVISIONING=$PROVISIONING; expected on-demand, spot, queued or queued-spot" >&2
     exit 2 ;;
esac
QUEUED_RESOURCE="${TPU_NAME}-qr"
GCLOUD_FLAGS=(--zone="$ZONE" --project="$PROJECT")

# ssh to workers: "all" or one index; the remote command runs in a login shell on each.
ssh_workers() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" \
    --command="$command"
}

case "$COMMAND" in
  create)
    require ACCELERATOR_TYPE "e.g. v4-32, v5litepod-64, v5p-128"
    require RUNTIME_VERSION "e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e)"
    spot=()
    [[ "$PROVISIONING" == *spot ]] && spot=(--spot)
    if [[ "$PROVISIONING" == queued* ]]; then
      run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" \
        --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
        --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
      echo "# The slice exists once the queued resource is ACTIVE: launch/tpu.sh status"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
    fi
    ;;
  status)
    if [[ "$PROVISIONING" == queued* ]]; then
      run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}"
    fi
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    ;;
  setup)
    require REPO_URL "the git URL of this repository, cloned on every worker"
    GIT_REF=${GIT_REF:-main}
    [[ "$DRY_RUN" == 1 ]] && echo "# checked GIT_REF=$GIT_REF"
    printf -v repo_url '%q' "$REPO_URL"
    printf -v git_ref '%q' "$GIT_REF"
    ssh_workers all "set -euo pipefail; \
sudo apt-get update -qq && sudo apt-get install -y -qq git $PYTHON_VERSION $PYTHON_VERSION-venv; \
if [ ! -d $REMOTE_REPO/.git ]; then git clone $repo_url $REMOTE_REPO; fi; \
cd $REMOTE_REPO && git fetch --all --tags && git checkout $git_ref && \
{ git pull --ff-only || true; }; \
$PYTHON_VERSION -m venv $REMOTE_VENV && $REMOTE_VENV/bin/pip install -q -U pip && \
$REMOTE_VENV/bin/pip install -q -r requirements.txt && \
$REMOTE_VENV/bin/pip install -q \"jax[tpu]==\$($REMOTE_VENV/bin/python -c 'import jax; print(jax.__version__)')\" && \
$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    ;;
  run)
    require CONFIG "the config, e.g. configs/imagenet256.py or configs/demo.py"
    require WORKDIR "the run directory, a gs:// path every worker can read and write"
    if [[ "$WORKDIR" != gs://* ]]; then
      echo "warning: WORKDIR=$WORKDIR is not gs://: each worker writes its own local copy," \
        "which only works on a single-host slice" >&2
    fi
    EXTRA_ARGS=${EXTRA_ARGS:-}
    [[ "$DRY_RUN" == 1 ]] && echo "# checked EXTRA_ARGS=$EXTRA_ARGS"
    printf -v config '%q' "$CONFIG"
    printf -v workdir '%q' "$WORKDIR"
    # EXTRA_ARGS splits on spaces here and each word is quoted for the workers' shells.
    read -r -a extra_words <<< "$EXTRA_ARGS"
    extra=""
    for word in "${extra_words[@]}"; do printf -v extra '%s %q' "$extra" "$word"; done
    # Same command on every worker. Refuses to start a second copy next to a running one;
    # appends to the log so a relaunch after preemption continues the same file.
    ssh_workers all "mkdir -p $REMOTE_LOGS && cd $REMOTE_REPO && \
if [ -f $REMOTE_LOGS/train.pid ] && kill -0 \$(cat $REMOTE_LOGS/train.pid) 2>/dev/null; then \
echo \"\$(hostname): training already running (pid \$(cat $REMOTE_LOGS/train.pid))\" >&2; exit 1; fi; \
PDM_JAX_CLOUD_TPU=1 nohup $REMOTE_VENV/bin/python -m pdm_jax.main --config=$config --workdir=$workdir$extra \
>> $REMOTE_LOGS/train_\$(hostname).log 2>&1 < /dev/null & echo \$! > $REMOTE_LOGS/train.pid; \
echo \"\$(hostname): started pid \$(cat $REMOTE_LOGS/train.pid)\""
    ;;
  tail)
    WORKER=${WORKER:-0}
    if ! [[ "$WORKER" =~ ^[0-9]+$ ]]; then
      echo "error: WORKER=$WORKER; expected a worker index (0, 1, ...)" >&2
      exit 2
    fi
    [[ "$DRY_RUN" == 1 ]] && echo "# checked WORKER=$WORKER"
    ssh_workers "$WORKER" "tail -n 200 -F $REMOTE_LOGS/train_\$(hostname).log"
    ;;
  stop)
    # SIGTERM: one process saves and exits; several processes agree on a step through JAX's
    # preemption service, all save it, then exit.
    ssh_workers all "if [ -f $REMOTE_LOGS/train.pid ] && kill -0 \$(cat $REMOTE_LOGS/train.pid) \
2>/dev/null; then kill -TERM \$(cat $REMOTE_LOGS/train.pid) && echo \"\$(hostname): sent SIGTERM\"; \
else echo \"\$(hostname): not running\"; fi"
    ;;
  delete)
    if [[ "$PROVISIONING" == queued* ]]; then
      run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" \
        --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
    fi
    ;;
  "")
    echo "error: no command given" >&2; usage >&2; exit 2 ;;
  *)
    echo "error: unknown command $COMMAND; expected create, status, setup, run, tail, stop," \
      "delete" >&2
    exit 2 ;;
esac
