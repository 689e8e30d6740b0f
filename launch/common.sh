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
