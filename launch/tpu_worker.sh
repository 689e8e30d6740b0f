#!/usr/bin/env bash
# Runs ON each Cloud TPU VM worker: launch/tpu.sh ships the repository (with this script) to
# every worker at setup, then calls it over ssh. It starts, follows and stops the pdm_jax
# processes, keeps their logs in the workdir and cleans stale TPU holders.
#
# Usage: launch/tpu_worker.sh COMMAND [ARGS]
#
#   start JOB CONFIG WORKDIR [FLAGS...]
#            start python -m pdm_jax.main --config=CONFIG --workdir=WORKDIR FLAGS in the
#            background (nohup, its own session), after refusing next to a running job:
#              JOB=train         PDM_JAX_CLOUD_TPU=1 (start jax.distributed over the slice);
#                                stale TPU holders are cleaned first (see clean)
#              JOB=prepare_data  --mode=prepare_data with JAX_PLATFORMS=cpu and
#                                PDM_JAX_CLOUD_TPU=0 (TPU_WORKER_HOSTNAMES and
#                                JAX_COORDINATOR_ADDRESS unset): one process, no TPU, no
#                                jax.distributed
#            Python appends to LOG_DIR/JOB_<hostname>.log; a supervisor copies that log to
#            WORKDIR/logs/JOB_<hostname>.log every LOG_SYNC_SECONDS and when the job ends
#            (spot VMs lose their boot disks), and records the exit status.
#   follow JOB   show JOB's log from its last start until it ends; exit with its status
#   stop [JOB]   (default train) SIGTERM, wait up to STOP_TIMEOUT seconds for the process to
#                exit (the trainer saves a checkpoint first), then SIGKILL; removes the pid
#                file and copies the log to the workdir
#   clean        remove LIBTPU_LOCKFILE and SIGKILL every process holding a TPU device file
#                (left by a crashed or killed run); refuses while a training job runs
#   idle         fail (naming the job) while a job runs
#
# Variables (environment, all optional):
#   LOG_DIR            logs, pid and status files: ~/pdm_jax_logs
#   PYTHON             ~/pdm_jax_venv/bin/python
#   STOP_TIMEOUT       stop: seconds to wait after SIGTERM before SIGKILL, default 600
#   LOG_SYNC_SECONDS   start: seconds between copies of the log into WORKDIR/logs, default 60
#   LIBTPU_LOCKFILE    clean: /tmp/libtpu_lockfile
#   TPU_DEVICE_FILES   clean: glob patterns of the TPU device files, "/dev/accel* /dev/vfio/[0-9]*"
#   SUDO               clean: command prefix to see and kill other users' holders, default sudo
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF="$REPO_ROOT/launch/tpu_worker.sh"
LOG_DIR=${LOG_DIR:-$HOME/pdm_jax_logs}
PYTHON=${PYTHON:-$HOME/pdm_jax_venv/bin/python}
STOP_TIMEOUT=${STOP_TIMEOUT:-600}
LOG_SYNC_SECONDS=${LOG_SYNC_SECONDS:-60}
LIBTPU_LOCKFILE=${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}
TPU_DEVICE_FILES=${TPU_DEVICE_FILES:-/dev/accel* /dev/vfio/[0-9]*}
SUDO=${SUDO-sudo}
HOST=$(hostname)
JOBS=(train prepare_data)

say() { echo "$HOST: $*"; }
fail() { echo "$HOST: error: $*" >&2; exit 1; }

for name in STOP_TIMEOUT LOG_SYNC_SECONDS; do
  [[ "${!name}" =~ ^[0-9]+$ ]] || fail "$name=${!name}; expected a number of seconds"
done

log_file() { echo "$LOG_DIR/${1}_$HOST.log"; }
pid_file() { echo "$LOG_DIR/$1.pid"; }

check_job() {
  case "$1" in
    train|prepare_data) ;;
    *) fail "unknown job '$1'; expected train or prepare_data" ;;
  esac
}

# alive PID: the process exists and is not a zombie (exited, not yet reaped).
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n "$state" && "$state" != Z* ]]
}

# running_pid JOB: prints the pid of JOB's live python process; fails if none. A pid file
# whose process is gone, or is no longer pdm_jax (pid reused), does not count.
running_pid() {
  local file pid
  file=$(pid_file "$1")
  [[ -f "$file" ]] || return 1
  pid=$(cat "$file")
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "pdm_jax.main" || return 1
  echo "$pid"
}

refuse_if_running() {
  local job pid
  for job in "${JOBS[@]}"; do
    if pid=$(running_pid "$job"); then
      fail "$job is running (pid $pid); launch/tpu.sh stop (JOB=$job) first"
    fi
  done
}

# copy_log JOB: the worker's log of JOB into WORKDIR/logs/ (the workdir of its last start).
copy_log() {
  local job=$1 log workdir dest
  log=$(log_file "$job")
  [[ -f "$log" && -f "$LOG_DIR/$job.workdir" ]] || return 0
  workdir=$(cat "$LOG_DIR/$job.workdir")
  dest="${workdir%/}/logs/$(basename "$log")"
  case "$workdir" in
    gs://*)
      gcloud storage cp "$log" "$dest" > /dev/null 2>&1 \
        || gsutil -q cp "$log" "$dest" > /dev/null 2>&1 \
        || echo "$HOST: warning: could not copy $log to $dest" >&2 ;;
    *://*)
      echo "$HOST: warning: cannot copy logs to $workdir (only gs:// and local paths)" >&2 ;;
    *)
      { mkdir -p "${workdir%/}/logs" && cp "$log" "$dest.tmp" && mv "$dest.tmp" "$dest"; } \
        || echo "$HOST: warning: could not copy $log to $dest" >&2 ;;
  esac
}

# clean: SIGKILL to every process holding a TPU device file, then remove the libtpu lock file.
clean() {
  local pid files=() holders
  if pid=$(running_pid train); then
    fail "train is running (pid $pid): not cleaning its TPU; launch/tpu.sh stop first"
  fi
  shopt -s nullglob
  # shellcheck disable=SC2206  # the patterns are meant to glob
  files=($TPU_DEVICE_FILES)
  shopt -u nullglob
  if (( ${#files[@]} )); then
    holders=$($SUDO lsof -t "${files[@]}" 2>/dev/null | sort -un | paste -sd, - || true)
    if [[ -n "$holders" ]]; then
      say "stale TPU holders:"
      ps -o pid=,args= -p "$holders" || true
      # shellcheck disable=SC2046  # one argument per pid
      $SUDO kill -KILL $(tr , ' ' <<< "$holders") 2>/dev/null || true
      say "sent SIGKILL to $holders"
      sleep 1
    fi
  fi
  if [[ -e "$LIBTPU_LOCKFILE" ]]; then
    $SUDO rm -f "$LIBTPU_LOCKFILE"
    say "removed $LIBTPU_LOCKFILE"
  fi
}

# supervise JOB CMD...: runs CMD with its output appended to JOB's log, keeps the pid file,
# copies the log every LOG_SYNC_SECONDS and at the end, records the exit status. It outlives
# SIGTERM/SIGINT/SIGHUP (a VM shutdown signals every process) to copy the last lines.
supervise() {
  local job=$1 log pid status=0 last=$SECONDS
  shift
  log=$(log_file "$job")
  "$@" >> "$log" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$(pid_file "$job").tmp"
  mv "$(pid_file "$job").tmp" "$(pid_file "$job")"
  trap 'true' TERM INT HUP
  while alive "$pid"; do
    sleep 0.5
    if (( SECONDS - last >= LOG_SYNC_SECONDS )); then copy_log "$job"; last=$SECONDS; fi
  done
  wait "$pid" && status=0 || status=$?
  echo "$(date -u +%FT%TZ) $HOST: $job (pid $pid) exited with status $status" >> "$log"
  copy_log "$job"
  echo "$status" > "$LOG_DIR/$job.status"  # last: stop and follow wait for it
}

start() {
  (( $# >= 3 )) || fail "usage: start JOB CONFIG WORKDIR [FLAGS...]"
  local job=$1 config=$2 workdir=$3 log i
  shift 3
  check_job "$job"
  refuse_if_running
  mkdir -p "$LOG_DIR"
  local env_vars=() mode=()
  case "$job" in
    train) clean; env_vars=(PDM_JAX_CLOUD_TPU=1) ;;
    prepare_data)  # one process that must not wait for the other workers
      env_vars=(-u TPU_WORKER_HOSTNAMES -u JAX_COORDINATOR_ADDRESS JAX_PLATFORMS=cpu
                PDM_JAX_CLOUD_TPU=0)
      mode=(--mode=prepare_data) ;;
  esac
  local cmd=(env "${env_vars[@]}" "$PYTHON" -m pdm_jax.main --config="$config"
             --workdir="$workdir" "${mode[@]}" "$@")
  log=$(log_file "$job")
  rm -f "$(pid_file "$job")" "$LOG_DIR/$job.status"
  case "$workdir" in  # where the log copies go; python runs in REPO_ROOT
    *://*|/*) echo "$workdir" > "$LOG_DIR/$job.workdir" ;;
    *) echo "$REPO_ROOT/$workdir" > "$LOG_DIR/$job.workdir" ;;
  esac
  touch "$log"
  stat -c %s "$log" > "$LOG_DIR/$job.offset"
  echo "$(date -u +%FT%TZ) $HOST: starting $job in $REPO_ROOT ($(cat "$REPO_ROOT/SOURCE_REVISION" \
    2>/dev/null || echo "revision unknown")): ${cmd[*]}" >> "$log"
  cd "$REPO_ROOT"
  setsid nohup bash "$SELF" _supervise "$job" "${cmd[@]}" >> "$log" 2>&1 < /dev/null &
  for (( i = 0; i < 300; i++ )); do
    [[ -f "$(pid_file "$job")" ]] && break
    sleep 0.1
  done
  [[ -f "$(pid_file "$job")" ]] || fail "$job did not start; see $log"
  say "started $job (pid $(cat "$(pid_file "$job")")); log $log, copied to ${workdir%/}/logs/"
}

follow() {
  local job=${1:-train} pid offset i
  check_job "$job"
  offset=$(cat "$LOG_DIR/$job.offset" 2>/dev/null || echo 0)
  if pid=$(running_pid "$job"); then
    tail -c "+$(( offset + 1 ))" -F --pid="$pid" "$(log_file "$job")" 2>/dev/null || true
  else
    tail -c "+$(( offset + 1 ))" "$(log_file "$job")" 2>/dev/null || true
  fi
  wait_for_status "$job" || fail "$job: no exit status recorded"
  return "$(cat "$LOG_DIR/$job.status")"
}

# wait_for_status JOB: up to 10 s for the supervisor to record JOB's exit (after its last copy).
wait_for_status() {
  local i
  for (( i = 0; i < 100; i++ )); do
    [[ -f "$LOG_DIR/$1.status" ]] && return 0
    sleep 0.1
  done
  return 1
}

stop() {
  local job=${1:-train} pid ticks=0
  check_job "$job"
  if ! pid=$(running_pid "$job"); then
    say "$job not running"
    rm -f "$(pid_file "$job")"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  say "sent SIGTERM to $job (pid $pid); waiting up to ${STOP_TIMEOUT} s for it to save and exit"
  while alive "$pid" && (( ticks < 5 * STOP_TIMEOUT )); do  # ticks of at least 0.2 s
    sleep 0.2
    ticks=$(( ticks + 1 ))
  done
  if alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
    say "warning: $job (pid $pid) still running after ${STOP_TIMEOUT} s: sent SIGKILL (a save" \
        "cut short leaves the previous checkpoint as the latest)"
    while alive "$pid"; do sleep 0.2; done
  else
    say "$job exited after about $(( (ticks + 4) / 5 )) s"
  fi
  rm -f "$(pid_file "$job")"
  wait_for_status "$job" || true
  copy_log "$job"
}

COMMAND=${1:-}
[[ $# -gt 0 ]] && shift
case "$COMMAND" in
  start) start "$@" ;;
  follow) follow "$@" ;;
  stop) stop "$@" ;;
  clean) clean ;;
  idle) refuse_if_running; say "idle" ;;
  _supervise) supervise "$@" ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
  *) echo "error: unknown command '$COMMAND'; expected start, follow, stop, clean or idle" >&2
     exit 2 ;;
esac
