#!/usr/bin/env bash
# Installs agentvm-supervise and what it needs on Debian 12 (or newer): QEMU and the tools the
# built-in guest is built with, from Debian's packages; the Python package in ./.venv, made with
# Debian's python3 so every user of the machine can run it, with the console filter's C scanner
# (supervisor/_scan.c; gcc and Python's headers build it). `--test` adds the test tools.
# As root it also links /usr/local/bin/agentvm-supervise. Safe to run again.
# `--bench` also puts supervisord (PyPI `supervisor`, a peer in bench/) in ./.venv-bench: its
# top-level package is also called `supervisor`, so it cannot share a venv with ours.
set -euo pipefail
cd "$(dirname "$0")"
test_tools=0
bench=0
for arg in "$@"; do
  case "$arg" in
    --test) test_tools=1 ;;
    --bench) bench=1 ;;
    *) echo "install.sh: unknown option $arg (use --test and/or --bench)" >&2; exit 64 ;;
  esac
done

packages=(qemu-system-x86 python3 python3-venv python3-dev gcc libc6-dev cpio apt dpkg gzip
  ca-certificates)
[ "$test_tools" = 1 ] && packages+=(tmux nix-bin systemd procps util-linux passwd)
[ "$bench" = 1 ] && packages+=(bash)  # and gcc, above, for the stub runner
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install.sh: missing Debian packages: ${missing[*]}. Run as root: apt-get install ${missing[*]}" >&2
    exit 69
  fi
  echo "install.sh: installing ${missing[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
fi
extra=""
[ "$test_tools" = 1 ] && extra="[test]"
.venv/bin/pip install -q --disable-pip-version-check -e ".${extra}" >&2
if [ "$(id -u)" = 0 ]; then
  ln -sf "$PWD/.venv/bin/agentvm-supervise" /usr/local/bin/agentvm-supervise
fi
if [ "$bench" = 1 ]; then
  [ -x .venv-bench/bin/python ] || /usr/bin/python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q --disable-pip-version-check "supervisor>=4.2" >&2
fi
echo "install.sh: agentvm-supervise installed ($PWD/.venv/bin/agentvm-supervise)" >&2
