#!/usr/bin/env bash
# microvm.nix's virtiofsd-run without systemd, for the bench: supervisord runs one
# [program:virtiofsd-TAG] per share and an event listener that counts their RUNNING events; when
# all are RUNNING the listener writes to a FIFO (where microvm.nix calls systemd-notify --ready),
# and only then does the runner start (systemd's After= ordering). When the runner exits,
# supervisord gets SIGTERM and is waited for (systemd stopping the virtiofsd unit).
#
# usage: supervisord_launcher.sh SUPERVISORD CONFIG READY_FIFO -- RUNNER [ARGS...]
set -euo pipefail
supervisord=$1
config=$2
ready=$3
shift 4
rm -f "$ready"
mkfifo "$ready"
"$supervisord" --configuration "$config" &
daemon=$!
stop() {
  kill -TERM "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  rm -f "$ready"
}
trap stop EXIT
read -r _ < "$ready"
"$@"
