# shellcheck shell=bash
# Sourced by tests/run, examples/run, bench/run and .ci/run (it lives beside the build files
# because it is part of setting up a build): installs the Debian packages a script needs,
# only those not installed yet, running `apt-get update` at most once per run of the scripts.
# Everything it prints goes to stderr, so a script's stdout stays its own (bench/run --json).

shardline_need_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
      missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  echo "shardline: installing missing Debian packages: ${missing[*]}" >&2
  local as_root=()
  if ((EUID != 0)); then
    if ! command -v sudo >/dev/null; then
      echo "shardline: not root and no sudo: install these first: ${missing[*]}" >&2
      return 1
    fi
    as_root=(sudo)
  fi
  if [[ -z ${SHARDLINE_APT_UPDATED:-} ]]; then
    "${as_root[@]}" apt-get update -q >&2
    export SHARDLINE_APT_UPDATED=1
  fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}
