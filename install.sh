#!/usr/bin/env bash
# Installs agentvm-supervise and what it needs on Debian 12 (or newer): QEMU and the tools the
# built-in guest is built with, from Debian's packages; the Python package in ./.venv, made with
# Debian's python3 so every user of the machine can run it, with the console filter's C scanner
# (supervisor/console/_scan.c; gcc and Python's headers build it). `--test` adds the test tools and what
# the bench needs (./test.sh runs `python -m bench --quick`): gcc for its stub runner (above) and
# supervisord (PyPI `supervisor`, a peer in bench/) in ./.venv-bench: its top-level package is also
# called `supervisor`, so it cannot share a venv with ours. `--bench` installs only the latter.
# As root it also links /usr/local/bin/agentvm-supervise, as a user ~/.local/bin/agentvm-supervise
# (systemd/agentvm@.service runs that one). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
test_tools=0
bench=0
for arg in "$@"; do
  case "$arg" in
    --test) test_tools=1 bench=1 ;;
    --bench) bench=1 ;;
    *) echo "install.sh: unknown option $arg (use --test and/or --bench)" >&2; exit 64 ;;
  esac
done

packages=(qemu-system-x86 python3 python3-venv python3-dev gcc libc6-dev cpio apt dpkg gzip
  ca-certificates
  # the agent guests (supervisor/guest/agent/build-agent.sh): a Debian root fs, packed as erofs
  mmdebstrap erofs-utils debian-archive-keyring xz-utils mount util-linux)
[ "$test_tools" = 1 ] && packages+=(tmux nix-bin systemd procps util-linux passwd iproute2 openssh-client)
# The container tests (tests/test_container.py): build the Containerfile from a base made locally
# by mmdebstrap (no registry), run it with runc (crun refuses hosts with hybrid cgroups);
# `podman kube play` needs catatonit for its pod's infra container.
[ "$test_tools" = 1 ] && packages+=(podman buildah runc catatonit mmdebstrap debian-archive-keyring)
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
# pip's output only when it fails: an editable build with a C extension prints setuptools'
# warnings about editable installs that say nothing about this one.
pip_log=$(mktemp)
trap 'rm -f "$pip_log"' EXIT
# editable_mode=compat: a plain path in a .pth; the default mode installs an import hook that
# costs every start of the venv's python ~40 ms (re, pathlib, importlib.util), a third of `run`'s.
if ! .venv/bin/pip install -q --disable-pip-version-check --config-settings editable_mode=compat \
  -e ".${extra}" >"$pip_log" 2>&1; then
  cat "$pip_log" >&2
  echo "install.sh: pip could not install agentvm-supervise (its output is above)" >&2
  exit 1
fi
if ! .venv/bin/python -c 'import supervisor.console._scan' 2>/dev/null; then
  echo "install.sh: warning: the console filter's C fast path (supervisor/console/_scan.c) did not compile;" \
    "the console works, at about half the throughput on escape-dense output. Check that gcc," \
    "libc6-dev and python3-dev are installed (and \$CC, if set), then run install.sh again." >&2
fi
if [ ! -x supervisor/egress/agentvm-handoff ]; then
  echo "install.sh: warning: the egress proxy's helper (supervisor/egress/handoff.c) did not compile;" \
    "--network allowlist works, with ~20-100 ms more per guest connection (handoff.py). Check that" \
    "gcc and libc6-dev are installed (and \$CC, if set), then run install.sh again." >&2
fi
if [ "$(id -u)" = 0 ]; then
  ln -sf "$PWD/.venv/bin/agentvm-supervise" /usr/local/bin/agentvm-supervise
elif [ -n "${HOME:-}" ] && { [ -L "$HOME/.local/bin/agentvm-supervise" ] || [ ! -e "$HOME/.local/bin/agentvm-supervise" ]; }; then
  # Where systemd/agentvm@.service's ExecStart looks (and pipx installs); never over a real file.
  mkdir -p "$HOME/.local/bin"
  ln -sfn "$PWD/.venv/bin/agentvm-supervise" "$HOME/.local/bin/agentvm-supervise"
fi
if [ "$bench" = 1 ]; then
  [ -x .venv-bench/bin/python ] || /usr/bin/python3 -m venv .venv-bench
  if ! .venv-bench/bin/python -c 'import supervisor.supervisord' 2>/dev/null; then
    .venv-bench/bin/pip install -q --disable-pip-version-check "supervisor>=4.2" >&2
  fi
fi
echo "install.sh: agentvm-supervise installed ($PWD/.venv/bin/agentvm-supervise)" >&2
