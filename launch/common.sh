# shellcheck shell=bash
# Helpers shared by launch/*.sh (sourced, never run): usage errors, dry-run printing, quoting.
#
# Every launch script takes options as --key=value only (one form, one parser, and an option
# value can never be mistaken for the next option), exits 2 with one line naming the bad
# argument on a usage mistake (like the CLI on a bad config), and with --dry-run prints each
# command it would run on its own line, shell-quoted with printf %q, and runs nothing.

# Empty arrays ("${a[@]}") are an unbound-variable error under `set -u` before bash 4.4.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "${0##*/}: needs bash >= 4.4 (macOS: brew install bash)" >&2
  exit 2
fi

DRY_RUN=0
# The checkout the scripts live in (what `tpu_vm.sh setup` ships to the workers by default).
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# usage_error MESSAGE: one line naming the bad argument, then the script's usage(); exit 2.
usage_error() {
  printf '%s: error: %s\n' "${0##*/}" "$1" >&2
  usage >&2
  exit 2
}

# require VALUE FLAG: a required option that is missing (or empty) is a usage error naming it.
require() {
  [[ -n $1 ]] || usage_error "missing required argument $2=..."
}

# quote ARG...: the arguments as one line that a shell parses back into exactly these words.
quote() {
  local line
  printf -v line '%q ' "$@"
  printf '%s\n' "${line% }"
}

# run CMD...: dry-run prints CMD on stdout and runs nothing; otherwise CMD is echoed to stderr
# as "+ CMD" (so a log shows what ran) and executed.
run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    "$@"
  fi
}
