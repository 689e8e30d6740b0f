# Shared helpers of the launch scripts (sourced, not run): --dry-run, quoting, variable checks.
# shellcheck shell=bash

DRY_RUN=0

# Prints a command the way a shell would read it back (arguments with spaces or shell
# characters in single quotes).
quote_args() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# Runs a command, or with --dry-run only prints it ("+ cmd ...").
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ '
    quote_args "$@"
  else
    echo "+ $(quote_args "$@")" >&2
    "$@"
  fi
}

# Prints a line of the plan that is not a single command (a redirection, a pipeline, a
# step's description): to stdout under --dry-run, else to stderr beside the commands run.
plan() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$*"
  else
    printf '%s\n' "$*" >&2
  fi
}

# require VAR "what it is": fails with a clear message when VAR is unset or empty.
require() {
  local name=$1 what=$2
  if [[ -z "${!name:-}" ]]; then
    echo "error: variable $name is not set: $what" >&2
    exit 2
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# checked $name=${!name}"
  fi
}

# Prints the running script's header comment, which is its usage.
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# Parses "[--dry-run] COMMAND [--dry-run]" into the globals COMMAND and DRY_RUN.
parse_command_line() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
      *) break ;;
    esac
  done
  COMMAND=${1:-}
  if [[ $# -gt 0 ]]; then shift; fi
  if [[ $# -gt 0 ]]; then
    case "$1" in --dry-run) DRY_RUN=1 ;; *) echo "error: unexpected argument $1" >&2; exit 2 ;; esac
  fi
}
