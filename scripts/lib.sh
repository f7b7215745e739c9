# Shared by the launch scripts (sourced, not run): printing commands and failing on bad arguments.
# shellcheck shell=bash

# Prints a command as a shell would read it back (single-quoting words with special characters).
show() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./=:@,+%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# A bad argument: the message, a hint, exit status 2.
die() { echo "$(basename "$0"): $*" >&2; echo "Try --help." >&2; exit 2; }
