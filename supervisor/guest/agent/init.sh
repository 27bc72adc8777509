#!/bin/bash
# /usr/lib/agentvm/init: PID 1 of the agent guest, after stage1.sh put the read-only root image
# under a tmpfs overlay (build-agent.sh installs it into the image).
#
# The host contract is the built-in guest's (supervisor/guest/init.sh): the kernel cmdline keys
# agentvm.mounts/uid/gid/cmd/term/rows/cols, one status line on org.agentvm.status, resize lines
# on org.agentvm.resize, power-off when the command ends. What differs, as claude-microvm's guest:
#   - no agentvm.cmd: the flavor's agent (/usr/lib/agentvm/flavor: claude, gemini or codex) runs;
#   - the command runs in bash as "agent" in /work with HOME=/home/agent, after the built-in
#     guest's /etc/agentvm/agent-env.sh (guest/agent-env.sh: $HOME/.microvm-env, the cached dev
#     shell with DIRENV_ALLOW=1, /run/agentvm/net.env);
#   - networking: agentvm.net=ADDR/PREFIX,GATEWAY,DNS (network.py) as the built-in guest reads it,
#     set up in network_up;
#   - ENABLE_CRI=podman (or docker: the same podman) starts podman's API service as root with
#     its storage in the cri-storage share (/var/lib/containers); the agent talks to it through
#     /run/podman/podman.sock (CONTAINER_HOST, DOCKER_HOST).
PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
umask 022
STATUS_PORT=org.agentvm.status
RESIZE_PORT=org.agentvm.resize
CONSOLE=/dev/hvc0
DEFAULT_MOUNTS=work:/work,agent-home:/home/agent,cri-storage:/var/lib/containers

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
exec </dev/null >/dev/null 2>/dev/kmsg

diag() { echo "agentvm-init: $*" >&2; }

find_port() { # find_port NAME TRIES: /dev/vportXpY of the virtio-serial port NAME
	local want=$1 tries=$2 f n d
	while :; do
		for f in /sys/class/virtio-ports/*/name; do
			[ -r "$f" ] || continue
			n=$(<"$f")
			d=${f%/name}
			d=/dev/${d##*/}
			if [ "$n" = "$want" ] && [ -c "$d" ]; then
				echo "$d"
				return 0
			fi
		done
		[ "$tries" -gt 0 ] || return 1
		tries=$((tries - 1))
		sleep 0.05
	done
}

report() { # the write blocks while no host end is connected: bounded
	local port
	port=$(find_port "$STATUS_PORT" 40) || {
		diag "no virtio-serial port named $STATUS_PORT; could not report: $1"
		return 1
	}
	timeout 5 bash -c 'printf "%s\n" "$1" >"$2"' report "$1" "$port" ||
		diag "writing to $STATUS_PORT ($port) failed; could not report: $1"
}

shutdown() {
	sync
	busybox poweroff -f
	echo o >/proc/sysrq-trigger 2>/dev/null
	while :; do sleep 3600; done
}

fail() {
	diag "$*"
	report "agentvm-guest-error=$*"
	shutdown
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

network_up() { # network_up ADDR/PREFIX,GATEWAY,DNS: the first NIC, static, on QEMU's user network
	local addr=${1%%,*} rest=${1#*,} gw dns dev= tries=40 d err
	gw=${rest%%,*} dns=${rest#*,}
	while [ -z "$dev" ]; do
		for d in /sys/class/net/*; do
			[ "${d##*/}" = lo ] || dev=${d##*/}
		done
		[ -n "$dev" ] && break
		[ "$tries" -gt 0 ] || fail "agentvm.net is set but the guest has no network interface (no virtio-net device?)"
		tries=$((tries - 1))
		sleep 0.05
	done
	err=$(ip addr add "$addr" dev "$dev" 2>&1) || fail "ip addr add $addr dev $dev failed: ${err##*: }"
	err=$(ip link set "$dev" up 2>&1) || fail "ip link set $dev up failed: ${err##*: }"
	err=$(ip route add default via "$gw" dev "$dev" 2>&1) || fail "ip route add default via $gw failed: ${err##*: }"
	printf 'nameserver %s\n' "$dns" >/etc/resolv.conf
	printf '127.0.0.1 localhost\n%s agentvm\n' "${addr%/*}" >/etc/hosts
	mkdir -p /run/agentvm
}

# --- console, pseudo file systems ----------------------------------------------------------
tries=200
while [ ! -c "$CONSOLE" ]; do
	[ "$tries" -gt 0 ] || fail "$CONSOLE did not appear within 10 s (no virtconsole device?)"
	tries=$((tries - 1))
	sleep 0.05
done
exec 2>"$CONSOLE"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || fail "mounting /dev/pts failed"
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || fail "mounting /run failed"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || fail "mounting /tmp failed"
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
ln -sf /proc/self/fd /dev/fd
hostname agentvm

# --- kernel cmdline ------------------------------------------------------------------------
mounts=$DEFAULT_MOUNTS uid=1000 gid=1000 cmd_b64= have_cmd= term=xterm-256color rows=24 cols=80 net= proxy=
read -r cmdline </proc/cmdline
set -f
for arg in $cmdline; do
	case $arg in
	agentvm.mounts=*) mounts=${arg#*=} ;;
	agentvm.uid=*) uid=${arg#*=} ;;
	agentvm.gid=*) gid=${arg#*=} ;;
	agentvm.cmd=*) cmd_b64=${arg#*=} have_cmd=1 ;;
	agentvm.term=*) term=${arg#*=} ;;
	agentvm.rows=*) rows=${arg#*=} ;;
	agentvm.cols=*) cols=${arg#*=} ;;
	agentvm.net=*) net=${arg#*=} ;;
	agentvm.proxy=*) proxy=${arg#*=} ;;
	esac
done
set +f
is_uint "$uid" || fail "agentvm.uid=$uid is not a number"
is_uint "$gid" || fail "agentvm.gid=$gid is not a number"
stty -F "$CONSOLE" sane 2>/dev/null
if is_uint "$rows" && is_uint "$cols"; then stty -F "$CONSOLE" rows "$rows" cols "$cols" 2>/dev/null; fi

if [ "$uid" != 1000 ] || [ "$gid" != 1000 ]; then
	sed -i "s/^agent:x:1000:1000:/agent:x:$uid:$gid:/" /etc/passwd &&
		sed -i "s/^agent:x:1000:/agent:x:$gid:/" /etc/group || fail "setting the agent user to $uid:$gid failed"
fi

# --- shares --------------------------------------------------------------------------------
IFS=, read -r -a entries <<<"$mounts"
for m in "${entries[@]}"; do
	tag=${m%%:*} path=${m#*:}
	if [ -z "$tag" ] || [ "$tag" = "$m" ] || [ -z "$path" ]; then fail "bad agentvm.mounts entry '$m' (want TAG:PATH)"; fi
	mkdir -p "$path" || fail "mkdir $path failed"
	err=$(mount -t virtiofs "$tag" "$path" 2>&1) || fail "mounting virtiofs tag $tag on $path failed: ${err##*: }"
done
chown "$uid:$gid" /home/agent /work 2>/dev/null

ip link set lo up
if [ -n "$net" ]; then network_up "$net"; fi
# egress allow-list (supervisor/egress): the proxy is the only way out, as in the built-in guest
if [[ $proxy =~ ^http://[0-9a-z.:]+$ ]]; then
	mkdir -p /run/agentvm
	for v in HTTP_PROXY HTTPS_PROXY http_proxy https_proxy; do echo "export $v=$proxy"; done >/run/agentvm/net.env
	echo "export NO_PROXY=localhost,127.0.0.1,::1 no_proxy=localhost,127.0.0.1,::1" >>/run/agentvm/net.env
elif [ -n "$proxy" ]; then
	diag "agentvm.proxy=$proxy ignored: not a plain http://ADDRESS:PORT"
fi

# --- terminal resize, power button ---------------------------------------------------------
resize_loop() {
	local port r c
	port=$(find_port "$RESIZE_PORT" 100) || exit 0
	while :; do
		while read -r r c _; do
			is_uint "$r" && is_uint "$c" && stty -F "$CONSOLE" rows "$r" cols "$c"
		done <"$port"
		sleep 0.2
	done
}
if [ -d /sys/class/virtio-ports ]; then resize_loop </dev/null >/dev/null 2>&1 & fi
if ls /dev/input/event* >/dev/null 2>&1; then
	mkdir -p /run/acpi/PWRF
	printf '#!/bin/sh\nkill -HUP -1\nsleep 5\nkill -KILL -1\n' >/run/acpi/PWRF/00000080
	chmod 0755 /run/acpi/PWRF/00000080
	busybox acpid -c /run/acpi -l /dev/null </dev/null >/dev/null 2>&1 || diag "acpid did not start: the guest ignores the power button"
fi

# --- ENABLE_CRI ----------------------------------------------------------------------------
# The env file belongs to the agent (0600 on the host): read it as the agent.
cri=$(setpriv --reuid="$uid" --regid="$gid" --init-groups bash -c \
	'[ -r /home/agent/.microvm-env ] && . /home/agent/.microvm-env; printf %s "${ENABLE_CRI:-}"' 2>/dev/null)
case ",$cri," in
*,podman,* | *,docker,*)
	mkdir -p /run/podman
	podman system service --time=0 unix:///run/podman/podman.sock </dev/null >/dev/null 2>/run/podman/service.log &
	for _ in $(seq 100); do [ -S /run/podman/podman.sock ] && break; sleep 0.1; done
	chgrp "$gid" /run/podman /run/podman/podman.sock 2>/dev/null && chmod 0750 /run/podman && chmod 0660 /run/podman/podman.sock ||
		diag "podman's API service did not start (see /run/podman/service.log)"
	;;
esac
if [ -n "$cri" ] && [[ ! ",$cri," =~ ,(podman|docker), ]]; then
	diag "ENABLE_CRI=$cri: this guest has podman only (also as docker); the others are not started"
fi

# --- the command ---------------------------------------------------------------------------
flavor=$(</usr/lib/agentvm/flavor)
if [ -n "$have_cmd" ]; then
	cmd=$(printf %s "$cmd_b64" | base64 -d 2>/dev/null) || fail "agentvm.cmd is not valid base64"
	[ -n "$cmd" ] || fail "agentvm.cmd is empty"
else
	cmd="exec $flavor"
fi
# the agent's shell: the env file (exported), the dev shell with DIRENV_ALLOW=1, then the command
# shellcheck disable=SC2016 # expanded by the agent's bash
prelude='. /etc/agentvm/agent-env.sh
if [ -S /run/podman/podman.sock ]; then export CONTAINER_HOST=unix:///run/podman/podman.sock DOCKER_HOST=unix:///run/podman/podman.sock; fi
cd /work 2>/dev/null || cd "$HOME"
'
cd /work 2>/dev/null || cd /
# setsid -c: a new session with hvc0 as its controlling terminal (Ctrl-C reaches the agent)
env -i PATH="$PATH" TERM="$term" NODE_EXTRA_CA_CERTS=/etc/ssl/certs/agentvm-host-ca.crt HOME=/home/agent USER=agent LOGNAME=agent SHELL=/bin/bash LANG=C.UTF-8 \
	setsid -c setpriv --reuid="$uid" --regid="$gid" --init-groups \
	bash -c "$prelude$cmd" <>"$CONSOLE" >&0 2>&0
status=$?
exec 2>"$CONSOLE"
report "agentvm-exit-status=$status"
shutdown
