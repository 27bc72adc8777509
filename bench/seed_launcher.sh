#!/usr/bin/env bash
# The seed's approach (claude-microvm's microvm-run) without systemd, for the bench: each share's
# virtiofsd is started with --socket-path, one after another, and its socket is polled with
# `[ -S ]` every 100 ms (at most 5 s) before the next one starts; then the runner runs as a child,
# and an EXIT trap stops the daemons and removes the sockets (systemctl --user stop + rm -f there).
#
# usage: seed_launcher.sh RUNTIME_DIR VIRTIOFSD SHARE_DIR... -- RUNNER [ARGS...]
# Each share's socket is RUNTIME_DIR/<basename of SHARE_DIR>.sock.
set -euo pipefail
runtime=$1
virtiofsd=$2
shift 2
pids=()
socks=()
cleanup() {
  if [ "${#pids[@]}" -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  rm -f "${socks[@]}"
}
trap cleanup EXIT

while [ "$1" != "--" ]; do
  dir=$1
  shift
  sock="$runtime/$(basename "$dir").sock"
  rm -f "$sock"
  "$virtiofsd" --socket-path="$sock" --shared-dir="$dir" --sandbox=namespace --cache=auto \
    --translate-uid="map:1000:$(id -u):1" --translate-gid="map:1000:$(id -g):1" --xattr &
  pids+=("$!")
  socks+=("$sock")
  for _ in $(seq 1 50); do
    [ -S "$sock" ] && break
    sleep 0.1
  done
  [ -S "$sock" ] || { echo "error: virtiofsd socket $sock did not appear" >&2; exit 1; }
done
shift
"$@"
