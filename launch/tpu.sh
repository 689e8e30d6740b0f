#!/usr/bin/env bash
# Cloud TPU VM slices (single- or multi-host) for pdm_jax: create, setup, prepare_data, run,
# tail, stop, delete.
#
# Usage: launch/tpu.sh [--dry-run] COMMAND
#
#   create        create the slice: on-demand, spot, or through a queued resource, and for a
#                 queued resource wait (polling describe) until it is ACTIVE
#   status        describe the slice (and its queued resource)
#   setup         ship THIS working tree (tracked and untracked files that git does not ignore,
#                 uncommitted changes included) to ALL workers, replacing ~/pdm_jax; apt
#                 python3.11 (waiting for other apt runs); a venv with requirements.txt (the
#                 runtime set) and jax[tpu] of the same jax version; then a self-check that
#                 runs the trainer's distributed start-up on every worker
#   prepare_data  on ONE worker (WORKER, default 0): python -m pdm_jax.main --mode=prepare_data
#                 with JAX on the CPU, so the dataset is prepared once into data.data_dir (a
#                 gs:// path in EXTRA_ARGS) before a multi-host run; follows its log
#   run           on ALL workers: clean stale TPU holders, then start the SAME training command
#                 in the background; relaunching it after a preemption resumes from the latest
#                 checkpoint in WORKDIR
#   tail          follow the log of one worker (WORKER, default 0; JOB=train or prepare_data)
#   stop          on ALL workers: SIGTERM the training process (it saves a checkpoint, then
#                 exits), wait up to STOP_TIMEOUT seconds for it to exit, then SIGKILL
#   delete        delete the slice (and its queued resource)
#
# On the workers, launch/tpu_worker.sh (shipped by setup) starts, stops and watches the
# processes: logs in ~/pdm_jax_logs/<job>_<hostname>.log, copied into WORKDIR/logs/ every
# minute and when the process ends (spot VMs lose their boot disks).
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
#   AUTOCHECKPOINT               create (optional): 1 = --autocheckpoint-enabled through
#                                gcloud alpha (Preview; v2-v4 and v5e): SIGTERM with time to save
#                                before a maintenance event. Default 0
#   POLL_SECONDS, ACTIVE_TIMEOUT create, queued: seconds between describes (60) and the most
#                                seconds to wait for ACTIVE (0 = as long as it is queued)
#   TRANSPARENT_HUGEPAGES        setup (optional): 1 = enable transparent hugepages (faster TPU
#                                runtime start-up on v5e and newer, as JAX's start-up suggests).
#                                Default 0
#   CONFIG, WORKDIR              prepare_data/run: --config and --workdir (a gs:// bucket every
#                                worker sees)
#   EXTRA_ARGS                   prepare_data/run (optional): more flags, e.g.
#                                "--config.data.data_dir=gs://b/tfds --config.mesh.shape=(-1,4)"
#   WORKER                       tail, prepare_data (optional): worker index, default 0
#   JOB                          tail (optional): train (default) or prepare_data
#   STOP_TIMEOUT                 stop (optional): seconds between SIGTERM and SIGKILL, default 600
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)

REMOTE_REPO='~/pdm_jax'          # expanded by the workers' shells
REMOTE_VENV='~/pdm_jax_venv'
REMOTE_LOGS='~/pdm_jax_logs'
REMOTE_WORKER="bash $REMOTE_REPO/launch/tpu_worker.sh"
PYTHON_VERSION=python3.11        # jax 0.10 needs Python >= 3.11; Ubuntu 22.04 images have 3.10
APT="sudo apt-get -o DPkg::Lock::Timeout=600"  # waits for unattended-upgrades after boot

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

check_int() {  # check_int NAME VALUE: a non-negative integer
  if ! [[ "$2" =~ ^[0-9]+$ ]]; then
    echo "error: $1=$2; expected a non-negative integer" >&2
    exit 2
  fi
  [[ "$DRY_RUN" == 1 ]] && echo "# checked $1=$2"
  return 0
}

check_flag() {  # check_flag NAME VALUE: 0 or 1
  if [[ "$2" != 0 && "$2" != 1 ]]; then
    echo "error: $1=$2; expected 0 or 1" >&2
    exit 2
  fi
  [[ "$DRY_RUN" == 1 ]] && echo "# checked $1=$2"
  return 0
}

# ssh to workers: "all" or one index; the remote command runs in a login shell on each.
ssh_workers() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" \
    --command="$command"
}

# CONFIG WORKDIR EXTRA_ARGS as words quoted for the workers' shells (into $job_args).
job_arguments() {
  require CONFIG "the config, e.g. configs/imagenet256.py or configs/demo.py"
  require WORKDIR "the run directory, a gs:// path every worker can read and write"
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "warning: WORKDIR=$WORKDIR is not gs://: each worker writes its own local copy," \
      "which only works on a single-host slice" >&2
  fi
  EXTRA_ARGS=${EXTRA_ARGS:-}
  [[ "$DRY_RUN" == 1 ]] && echo "# checked EXTRA_ARGS=$EXTRA_ARGS"
  printf -v job_args '%q %q' "$CONFIG" "$WORKDIR"
  # EXTRA_ARGS splits on spaces here and each word is quoted for the workers' shells.
  local extra_words word
  read -r -a extra_words <<< "$EXTRA_ARGS"
  for word in "${extra_words[@]}"; do printf -v job_args '%s %q' "$job_args" "$word"; done
}

# Polls the queued resource until it is ACTIVE (the slice exists); fails on a terminal state.
wait_until_active() {
  POLL_SECONDS=${POLL_SECONDS:-60}
  ACTIVE_TIMEOUT=${ACTIVE_TIMEOUT:-0}
  check_int POLL_SECONDS "$POLL_SECONDS"
  check_int ACTIVE_TIMEOUT "$ACTIVE_TIMEOUT"
  local describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE"
                  "${GCLOUD_FLAGS[@]}" --format='value(state.state)')
  plan "# wait until the queued resource is ACTIVE: every $POLL_SECONDS s, until ACTIVE" \
    "(fails on FAILED, SUSPENDING, SUSPENDED or DELETING; ACTIVE_TIMEOUT=$ACTIVE_TIMEOUT s," \
    "0 = no limit):"
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"
    return 0
  fi
  echo "+ $(quote_args "${describe[@]}")" >&2
  local state started=$SECONDS
  while true; do
    state=$("${describe[@]}")
    echo "# $(date -u +%FT%TZ) $QUEUED_RESOURCE: ${state:-unknown}" >&2
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|DELETING)
        echo "error: queued resource $QUEUED_RESOURCE is $state; see launch/tpu.sh status" >&2
        exit 1 ;;
    esac
    if (( ACTIVE_TIMEOUT > 0 && SECONDS - started >= ACTIVE_TIMEOUT )); then
      echo "error: $QUEUED_RESOURCE not ACTIVE after $ACTIVE_TIMEOUT s (state $state)" >&2
      exit 1
    fi
    sleep "$POLL_SECONDS"
  done
}

case "$COMMAND" in
  create)
    require ACCELERATOR_TYPE "e.g. v4-32, v5litepod-64, v5p-128"
    require RUNTIME_VERSION "e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e)"
    AUTOCHECKPOINT=${AUTOCHECKPOINT:-0}
    check_flag AUTOCHECKPOINT "$AUTOCHECKPOINT"
    gcloud_tpus=(gcloud compute tpus)
    options=()
    [[ "$PROVISIONING" == *spot ]] && options+=(--spot)
    if [[ "$AUTOCHECKPOINT" == 1 ]]; then
      # Preview: only through the alpha API. A maintenance event then sends SIGTERM and waits
      # for the save; without it a maintenance event may give no time (ckpt.every decides).
      gcloud_tpus=(gcloud alpha compute tpus)
      options+=(--autocheckpoint-enabled)
    fi
    if [[ "$PROVISIONING" == queued* ]]; then
      run "${gcloud_tpus[@]}" queued-resources create "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}" \
        --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
        --runtime-version="$RUNTIME_VERSION" "${options[@]}"
      wait_until_active
    else
      run "${gcloud_tpus[@]}" tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${options[@]}"
    fi
    ;;
  status)
    if [[ "$PROVISIONING" == queued* ]]; then
      run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${GCLOUD_FLAGS[@]}"
    fi
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    ;;
  setup)
    TRANSPARENT_HUGEPAGES=${TRANSPARENT_HUGEPAGES:-0}
    check_flag TRANSPARENT_HUGEPAGES "$TRANSPARENT_HUGEPAGES"
    if ! git -C "$REPO_ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
      echo "error: $REPO_ROOT is not a git working tree: setup ships the files git lists" >&2
      exit 2
    fi
    revision=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)
    [[ "$DRY_RUN" == 1 ]] && echo "# checked revision=$revision"
    if [[ "$DRY_RUN" == 1 ]]; then
      archive="${TMPDIR:-/tmp}/pdm_jax_src.XXXXXX/pdm_jax_src.tar.gz"
    else
      archive_dir=$(mktemp -d "${TMPDIR:-/tmp}/pdm_jax_src.XXXXXX")
      trap 'rm -rf "$archive_dir"' EXIT
      archive="$archive_dir/pdm_jax_src.tar.gz"
    fi
    # The working tree as it is: tracked files (with uncommitted changes) and untracked ones
    # that .gitignore does not exclude; files deleted from the tree are left out.
    plan "+ git -C $(quote_args "$REPO_ROOT") ls-files -z --cached --others --exclude-standard" \
      "| (only files that exist) | tar -C $(quote_args "$REPO_ROOT") --null -T - -czf" \
      "$(quote_args "$archive")"
    if [[ "$DRY_RUN" == 0 ]]; then
      git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do
            if [[ -e "$REPO_ROOT/$f" ]]; then printf '%s\0' "$f"; fi
          done \
        | tar -C "$REPO_ROOT" --null -T - -czf "$archive"
      echo "# $(du -h "$archive" | cut -f1) archive of $REPO_ROOT at $revision" >&2
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:pdm_jax_src.tar.gz" \
      "${GCLOUD_FLAGS[@]}" --worker=all
    printf -v rev '%q' "$revision"
    # The self-check runs the trainer's distributed start-up (jax.distributed over the slice).
    selfcheck="'import socket, jax; from pdm_jax import distributed; \
distributed.maybe_initialize_distributed(); print(socket.gethostname(), \"process\", \
jax.process_index(), \"of\", jax.process_count(), \"devices:\", jax.local_device_count(), \
\"local,\", jax.device_count(), \"global\")'"
    hugepages=""
    if [[ "$TRANSPARENT_HUGEPAGES" == 1 ]]; then
      hugepages="echo always | sudo tee /sys/kernel/mm/transparent_hugepage/enabled > /dev/null; "
    fi
    # Unpack next to the old tree; replace it only when no job runs on that worker.
    ssh_workers all "set -euo pipefail; \
rm -rf $REMOTE_REPO.new && mkdir -p $REMOTE_REPO.new && \
tar -xzf ~/pdm_jax_src.tar.gz -C $REMOTE_REPO.new && rm -f ~/pdm_jax_src.tar.gz; \
bash $REMOTE_REPO.new/launch/tpu_worker.sh idle; \
rm -rf $REMOTE_REPO && mv $REMOTE_REPO.new $REMOTE_REPO && \
echo $rev > $REMOTE_REPO/SOURCE_REVISION; \
$APT update -qq && $APT install -y -qq $PYTHON_VERSION $PYTHON_VERSION-venv lsof; \
${hugepages}$PYTHON_VERSION -m venv $REMOTE_VENV && $REMOTE_VENV/bin/pip install -q -U pip && \
$REMOTE_VENV/bin/pip install -q -r $REMOTE_REPO/requirements.txt && \
$REMOTE_VENV/bin/pip install -q \"jax[tpu]==\$($REMOTE_VENV/bin/python -c 'import jax; print(jax.__version__)')\"; \
$REMOTE_WORKER clean; \
cd $REMOTE_REPO && PDM_JAX_CLOUD_TPU=1 $REMOTE_VENV/bin/python -c $selfcheck"
    ;;
  prepare_data)
    job_arguments
    WORKER=${WORKER:-0}
    check_int WORKER "$WORKER"
    # One process, JAX on the CPU, no jax.distributed (tpu_worker.sh); follows its log. If the
    # ssh session drops, the preparation goes on: JOB=prepare_data launch/tpu.sh tail.
    ssh_workers "$WORKER" "$REMOTE_WORKER start prepare_data $job_args && \
$REMOTE_WORKER follow prepare_data"
    ;;
  run)
    job_arguments
    # Same command on every worker (tpu_worker.sh start): refuses next to a running job,
    # SIGKILLs stale TPU holders and removes /tmp/libtpu_lockfile, then starts
    # PDM_JAX_CLOUD_TPU=1 python -m pdm_jax.main --config=CONFIG --workdir=WORKDIR EXTRA_ARGS.
    ssh_workers all "$REMOTE_WORKER start train $job_args"
    ;;
  tail)
    WORKER=${WORKER:-0}
    check_int WORKER "$WORKER"
    JOB=${JOB:-train}
    case "$JOB" in
      train|prepare_data) [[ "$DRY_RUN" == 1 ]] && echo "# checked JOB=$JOB" ;;
      *) echo "error: JOB=$JOB; expected train or prepare_data" >&2; exit 2 ;;
    esac
    ssh_workers "$WORKER" "tail -n 200 -F $REMOTE_LOGS/${JOB}_\$(hostname).log"
    ;;
  stop)
    STOP_TIMEOUT=${STOP_TIMEOUT:-600}
    check_int STOP_TIMEOUT "$STOP_TIMEOUT"
    # SIGTERM: one process saves and exits; several processes agree on a step through JAX's
    # preemption service, all save it, then exit. Returns once every worker's process is gone.
    plan "# on every worker: SIGTERM to the trainer, wait up to STOP_TIMEOUT=$STOP_TIMEOUT s" \
      "for it to exit, else SIGKILL; remove the pid file; copy the log into WORKDIR/logs/"
    ssh_workers all "STOP_TIMEOUT=$STOP_TIMEOUT $REMOTE_WORKER stop train"
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
    echo "error: unknown command $COMMAND; expected create, status, setup, prepare_data, run," \
      "tail, stop, delete" >&2
    exit 2 ;;
esac
