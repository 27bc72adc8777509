#!/bin/sh
# agentvm-console-resize [PORT [CONSOLE]]: give the guest's console the size of the host terminal.
#
# agentvm-supervise writes "ROWS COLS" lines to the virtio-serial port org.agentvm.resize when the
# terminal attached to the VM's console changes size (virtconsole does not carry the size itself:
# microvm.nix#123). Each line becomes `stty rows R cols C` on the console, which signals SIGWINCH
# to its foreground process group, so a TUI redraws at the new size. Other lines are ignored. A
# read ends when the host end closes; the port is then opened again.
port=${1:-/dev/virtio-ports/org.agentvm.resize}
console=${2:-/dev/hvc0}
while :; do
	while read -r rows cols _; do
		case "$rows:$cols" in
		*[!0-9:]* | :* | *:) continue ;;
		esac
		stty -F "$console" rows "$rows" cols "$cols" || true
	done <"$port"
	sleep 0.2
done
