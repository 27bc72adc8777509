# /usr/lib/agentvm/init-lib.sh: the host contract both guests' PID 1 keep, in one place. Sourced
# by the built-in guest's /init (guest/init.sh, busybox sh) and the agent guest's init
# (guest/agent/init.sh, bash), so it is POSIX sh. The contract itself is described at the top of
# guest/init.sh; supervisor/guest.py and supervisor/network.py are the host's side.
#
# The order an init calls these in: wait_for_console, mount_runtime_dirs, read_cmdline,
# set_agent_ids, net_up (when $net), write_proxy_env, mount_shares, start_resize_loop,
# start_power_button; then its own extras, decode_command, run its command, report, shutdown.

DEFAULT_MOUNTS=work:/work,agent-home:/home/agent,cri-storage:/var/lib/containers
STATUS_PORT=org.agentvm.status
RESIZE_PORT=org.agentvm.resize
CONSOLE=/dev/hvc0

diag() {
	echo "agentvm-init: $*" >&2
}

# find_port NAME TRIES: print /dev/vportXpY of the virtio-serial port called NAME, polling every
# 50 ms up to TRIES times (the name arrives from the host after the port appears).
find_port() {
	_want=$1
	_tries=$2
	while :; do
		for _f in /sys/class/virtio-ports/*/name; do
			[ -r "$_f" ] || continue
			_n=
			read -r _n <"$_f" 2>/dev/null
			if [ "$_n" = "$_want" ]; then
				_d=${_f%/name}
				_d=/dev/${_d##*/}
				if [ -c "$_d" ]; then
					echo "$_d"
					return 0
				fi
			fi
		done
		[ "$_tries" -gt 0 ] || return 1
		_tries=$((_tries - 1))
		sleep 0.05
	done
}

# report LINE: write LINE to the status port. A write blocks while no host end is connected (e.g. an
# unconnected socket chardev), so it is bounded.
report() {
	_port=$(find_port "$STATUS_PORT" 40) || {
		diag "no virtio-serial port named $STATUS_PORT; could not report: $1"
		return 1
	}
	# shellcheck disable=SC2016 # expanded by the inner sh
	timeout 5 sh -c 'printf "%s\n" "$1" >"$2"' report "$1" "$_port" ||
		diag "writing to $STATUS_PORT ($_port) failed; could not report: $1"
}

shutdown() {
	sync
	busybox poweroff -f
	echo o >/proc/sysrq-trigger 2>/dev/null
	while :; do sleep 3600; done
}

# fail REASON: the guest cannot run the command; tell the host and the console, power off.
fail() {
	diag "$*"
	report "agentvm-guest-error=$*"
	shutdown
}

is_uint() {
	case $1 in '' | *[!0-9]*) return 1 ;; esac
	return 0
}

# wait_for_console: hvc0 appears once its driver is probed; diagnostics go there from then on.
wait_for_console() {
	_tries=200 # 10 s
	while [ ! -c "$CONSOLE" ]; do
		[ "$_tries" -gt 0 ] || fail "$CONSOLE did not appear within 10 s (no virtconsole device?)"
		_tries=$((_tries - 1))
		sleep 0.05
	done
	exec 2>"$CONSOLE"
}

# mount_runtime_dirs: what programs expect beyond /proc, /sys and /dev; the loopback up.
mount_runtime_dirs() {
	mkdir -p /dev/pts /dev/shm
	mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || fail "mounting /dev/pts failed"
	[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
	mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
	mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || fail "mounting /tmp failed"
	mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || fail "mounting /run failed"
	mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null # podman in the agent guest wants it
	ln -sf /proc/self/fd /dev/fd
	ln -sf /proc/self/fd/0 /dev/stdin
	ln -sf /proc/self/fd/1 /dev/stdout
	ln -sf /proc/self/fd/2 /dev/stderr
	hostname agentvm
	ip link set lo up 2>/dev/null
}

# read_cmdline: the agentvm.* keys of the kernel command line into shell variables; hvc0 gets the
# terminal's size.
read_cmdline() {
	mounts=$DEFAULT_MOUNTS
	uid=1000
	gid=1000
	cmd_b64=
	have_cmd=
	term=xterm-256color
	rows=24 # a 0x0 window confuses full-screen programs: the host passes the real size
	cols=80
	proxy=
	net=
	ssh=
	read -r _cmdline </proc/cmdline
	set -f # split the cmdline on whitespace, never glob it
	for _arg in $_cmdline; do
		case $_arg in
		agentvm.mounts=*) mounts=${_arg#*=} ;;
		agentvm.uid=*) uid=${_arg#*=} ;;
		agentvm.gid=*) gid=${_arg#*=} ;;
		agentvm.cmd=*) cmd_b64=${_arg#*=} have_cmd=1 ;;
		agentvm.term=*) term=${_arg#*=} ;;
		agentvm.rows=*) rows=${_arg#*=} ;;
		agentvm.cols=*) cols=${_arg#*=} ;;
		agentvm.proxy=*) proxy=${_arg#*=} ;;
		agentvm.net=*) net=${_arg#*=} ;;
		agentvm.ssh=*) ssh=${_arg#*=} ;;
		esac
	done
	set +f
	is_uint "$uid" || fail "agentvm.uid=$uid is not a number"
	is_uint "$gid" || fail "agentvm.gid=$gid is not a number"
	stty -F "$CONSOLE" sane 2>/dev/null
	if is_uint "$rows" && is_uint "$cols"; then
		stty -F "$CONSOLE" rows "$rows" cols "$cols" 2>/dev/null
	fi
}

# set_agent_ids: the user "agent" gets the host's ids; the mount points are agent's, for shares
# that are not mounted over them (before mounting: a chown on a share would reach the host).
set_agent_ids() {
	if [ "$uid" != 1000 ] || [ "$gid" != 1000 ]; then
		if ! sed -i "s/^agent:x:1000:1000:/agent:x:$uid:$gid:/" /etc/passwd ||
			! sed -i "s/^agent:x:1000:/agent:x:$gid:/" /etc/group; then
			fail "setting the agent user to $uid:$gid failed"
		fi
	fi
	chown "$uid:$gid" /work /home/agent 2>/dev/null
}

# net_up ADDR/PREFIX,GATEWAY,DNS: the first NIC gets a static address on QEMU's user network (or a
# tap): slirp's addresses are fixed by the host, so DHCP would only cost a round trip (and
# AF_PACKET, which the built-in guest's kernel has as a module, for udhcpc). What the agent's
# environment needs from the network goes to /run/agentvm/net.env, which agent-env.sh sources last.
net_up() {
	_addr=${1%%,*}
	_rest=${1#*,}
	_gw=${_rest%%,*}
	_dns=${_rest#*,}
	_dev=
	_tries=40 # 2 s: virtio_net probes its device while insmod runs, so it is normally there at once
	while :; do
		for _d in /sys/class/net/*; do
			[ "${_d##*/}" = lo ] || [ ! -e "$_d" ] || {
				_dev=${_d##*/}
				break
			}
		done
		[ -z "$_dev" ] || break
		[ "$_tries" -gt 0 ] || fail "agentvm.net is set but the guest has no network interface (no virtio-net device?)"
		_tries=$((_tries - 1))
		sleep 0.05
	done
	err=$(ip addr add "$_addr" dev "$_dev" 2>&1) || fail "ip addr add $_addr dev $_dev failed: ${err##*: }"
	err=$(ip link set "$_dev" up 2>&1) || fail "ip link set $_dev up failed: ${err##*: }"
	err=$(ip route add default via "$_gw" dev "$_dev" 2>&1) || fail "ip route add default via $_gw failed: ${err##*: }"
	# ping without a raw socket (iputils' ping, ICMP datagram sockets), for every user, as most
	# distributions allow
	echo "0 2147483647" >/proc/sys/net/ipv4/ping_group_range
	printf 'nameserver %s\n' "$_dns" >/etc/resolv.conf
	printf '127.0.0.1 localhost\n%s agentvm\n' "${_addr%/*}" >/etc/hosts
	mkdir -p /run/agentvm
}

# write_proxy_env: egress allow-list mode (supervisor/egress): the proxy is the only way out; both
# spellings, since curl and busybox wget read the lower-case ones.
write_proxy_env() {
	case $proxy in
	'') ;;
	*[!0-9a-z:/.]* | [!h]* | h[!t]*) diag "agentvm.proxy=$proxy ignored: not a plain http://ADDRESS:PORT" ;;
	*)
		mkdir -p /run/agentvm
		for _v in HTTP_PROXY HTTPS_PROXY http_proxy https_proxy; do
			echo "export $_v=$proxy"
		done >/run/agentvm/net.env
		echo "export NO_PROXY=localhost,127.0.0.1,::1 no_proxy=localhost,127.0.0.1,::1" >>/run/agentvm/net.env
		;;
	esac
}

# mount_shares: every TAG:PATH of agentvm.mounts, as virtiofs.
mount_shares() {
	_saved_ifs=$IFS
	set -f
	IFS=,
	# shellcheck disable=SC2086 # split on commas
	set -- $mounts
	IFS=$_saved_ifs
	set +f
	for _m in "$@"; do
		_tag=${_m%%:*}
		_path=${_m#*:}
		if [ -z "$_tag" ] || [ "$_tag" = "$_m" ] || [ -z "$_path" ]; then
			fail "bad agentvm.mounts entry '$_m' (want TAG:PATH)"
		fi
		mkdir -p "$_path" || fail "mkdir $_path failed"
		err=$(mount -t virtiofs "$_tag" "$_path" 2>&1) ||
			fail "mounting virtiofs tag $_tag on $_path failed: ${err##*: }"
	done
}

# start_resize_loop: the host's "ROWS COLS" lines resize hvc0 (the foreground program gets
# SIGWINCH). A read returns EOF while no host end is connected to the port, so the loop reopens it.
resize_loop() {
	_port=$(find_port "$RESIZE_PORT" 100) || exit 0
	while :; do
		while read -r _r _c _; do
			is_uint "$_r" && is_uint "$_c" && stty -F "$CONSOLE" rows "$_r" cols "$_c"
		done <"$_port"
		sleep 0.2
	done
}
start_resize_loop() {
	if [ -d /sys/class/virtio-ports ]; then
		resize_loop </dev/null >/dev/null 2>&1 &
	fi
}

# start_power_button: the host's graceful stop is ACPI's power button (QMP system_powerdown).
# busybox acpid runs PWRF/00000080 for it: hang up every process but init, as a closed terminal
# would, and kill what is left after 5 s. The command's exit then lets init report and power off.
start_power_button() {
	ls /dev/input/event* >/dev/null 2>&1 || return 0
	mkdir -p /run/acpi/PWRF
	printf '#!/bin/sh\nkill -HUP -1\nsleep 5\nkill -KILL -1\n' >/run/acpi/PWRF/00000080
	chmod 0755 /run/acpi/PWRF/00000080
	busybox acpid -c /run/acpi -l /dev/null </dev/null >/dev/null 2>&1 ||
		diag "acpid did not start: the guest ignores the power button"
}

# decode_command: agentvm.cmd into $cmd (the caller runs it, or its default without agentvm.cmd).
decode_command() {
	cmd=$(printf %s "$cmd_b64" | base64 -d 2>/dev/null) || fail "agentvm.cmd is not valid base64"
	[ -n "$cmd" ] || fail "agentvm.cmd is empty"
}
