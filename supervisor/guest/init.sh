#!/bin/sh
# /init of the agentvm-supervise built-in guest (busybox initramfs, copied in by build-assets.sh).
#
# Contract with the host (supervisor/ depends on exactly this):
#   kernel cmdline (read from /proc/cmdline):
#     console=hvc0 quiet                    set by the host; the console is a virtconsole (hvc0)
#     agentvm.mounts=TAG:PATH,TAG:PATH,...  virtiofs shares to mount (default below; empty: none)
#     agentvm.uid=N agentvm.gid=N           ids of the user "agent" (default 1000/1000)
#     agentvm.cmd=BASE64                    base64 of a shell command string, run as agent by
#                                           `sh -c` in /work; absent: interactive `sh -l`
#     agentvm.term=T                        TERM for the command (default xterm-256color)
#     agentvm.rows=R agentvm.cols=C         initial size of hvc0 (default 24x80)
#     agentvm.proxy=http://ADDR:PORT        egress allow-list mode: /run/agentvm/net.env exports
#                                           HTTP(S)_PROXY, http(s)_proxy, NO_PROXY/no_proxy
#     agentvm.net=ADDR/PREFIX,GATEWAY,DNS   the first NIC's static address (QEMU's user network or
#                                           a tap on a host bridge: supervisor/network.py); absent:
#                                           no network setup
#     agentvm.ssh=DIR                       run an SSH server (dropbear, port 22, keys only, no root)
#                                           with the host key DIR/ssh_host_ed25519_key (OpenSSH
#                                           format, a read-only share: supervisor/sshkeys.py);
#                                           DIR/authorized_keys becomes agent's ~/.ssh/authorized_keys
#   virtio-serial ports (found by name under /sys/class/virtio-ports):
#     org.agentvm.status  the guest writes exactly one line, then powers off:
#                           agentvm-exit-status=N      the command ran and exited with N
#                           agentvm-guest-error=REASON the guest failed before running it
#     org.agentvm.resize  optional; the host writes lines "ROWS COLS", applied to hvc0 (SIGWINCH)
#   environment: the command (or the shell) runs as agent after /etc/agentvm/agent-env.sh, which
#   loads $HOME/.microvm-env and, with DIRENV_ALLOW=1, the cached dev shell.
#   console: the command runs with hvc0 as its controlling terminal (Ctrl-C reaches it). On the
#   happy path init prints nothing; its diagnostics start with "agentvm-init: ".
#   After the command the guest syncs and powers off (QEMU exits 0 with -no-reboot).

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

# build-assets.sh writes the modules it ships, each after its dependencies, to
# /lib/modules/load-order (built-in ones are left out)
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio virtio_console fuse virtiofs failover net_failover virtio_net button evdev"
DEFAULT_MOUNTS=work:/work,agent-home:/home/agent,cri-storage:/var/lib/containers
STATUS_PORT=org.agentvm.status
RESIZE_PORT=org.agentvm.resize
CONSOLE=/dev/hvc0

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
# The kernel could not open /dev/console (hvc0 is a module): give init defined stdio. Until hvc0
# exists, diagnostics go to the kernel log.
exec </dev/null >/dev/null 2>/dev/kmsg

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
	poweroff -f
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

# --- modules and console ---------------------------------------------------------------------
if [ -r /lib/modules/load-order ]; then
	MODULES=$(cat /lib/modules/load-order)
fi
for m in $MODULES; do
	[ -e "/lib/modules/$m.ko" ] || continue
	err=$(insmod "/lib/modules/$m.ko" 2>&1) || fail "insmod $m failed: ${err##*: }"
done

tries=200 # 10 s
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
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || fail "mounting /tmp failed"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || fail "mounting /run failed"
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname agentvm
ip link set lo up 2>/dev/null

# --- kernel cmdline --------------------------------------------------------------------------
mounts=$DEFAULT_MOUNTS
uid=1000
gid=1000
cmd_b64=
have_cmd=
term=xterm-256color
rows=24 # a 0x0 window confuses full-screen programs: the host passes the real size
cols=80
net=
ssh=
read -r cmdline </proc/cmdline
set -f # split the cmdline on whitespace, never glob it
for arg in $cmdline; do
	case $arg in
	agentvm.mounts=*) mounts=${arg#*=} ;;
	agentvm.uid=*) uid=${arg#*=} ;;
	agentvm.gid=*) gid=${arg#*=} ;;
	agentvm.cmd=*) cmd_b64=${arg#*=} have_cmd=1 ;;
	agentvm.term=*) term=${arg#*=} ;;
	agentvm.rows=*) rows=${arg#*=} ;;
	agentvm.cols=*) cols=${arg#*=} ;;
	agentvm.proxy=*) proxy=${arg#*=} ;;
	agentvm.net=*) net=${arg#*=} ;;
	agentvm.ssh=*) ssh=${arg#*=} ;;
	esac
done
set +f
is_uint "$uid" || fail "agentvm.uid=$uid is not a number"
is_uint "$gid" || fail "agentvm.gid=$gid is not a number"

stty -F "$CONSOLE" sane 2>/dev/null
if is_uint "$rows" && is_uint "$cols"; then
	stty -F "$CONSOLE" rows "$rows" cols "$cols" 2>/dev/null
fi

# --- network -------------------------------------------------------------------------------
# The one place the guest's network is set up. net_up ADDR/PREFIX,GATEWAY,DNS: the first NIC (eth0)
# gets a static address on QEMU's user network: slirp's addresses are fixed by the host, so DHCP
# would only cost a round trip (and AF_PACKET, which this kernel has as a module, for udhcpc).
# What the agent's environment needs from the network (a proxy, say) goes to /run/agentvm/net.env,
# which /etc/agentvm/agent-env.sh sources last.
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
if [ -n "$net" ]; then
	net_up "$net"
fi
# Egress allow-list (supervisor/egress): the proxy is the only way out; both spellings, since curl
# and busybox wget read the lower-case ones.
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

# --- the agent user --------------------------------------------------------------------------
if [ "$uid" != 1000 ] || [ "$gid" != 1000 ]; then
	if ! sed -i "s/^agent:x:1000:1000:/agent:x:$uid:$gid:/" /etc/passwd ||
		! sed -i "s/^agent:x:1000:/agent:x:$gid:/" /etc/group; then
		fail "setting the agent user to $uid:$gid failed"
	fi
fi
# the mount points as agent's, for shares that are not mounted over them
chown "$uid:$gid" /work /home/agent 2>/dev/null

# --- virtiofs shares -------------------------------------------------------------------------
set -f
IFS=,
# shellcheck disable=SC2086 # split on commas
set -- $mounts
IFS=' 	
'
set +f
for m in "$@"; do
	tag=${m%%:*}
	path=${m#*:}
	if [ -z "$tag" ] || [ "$tag" = "$m" ] || [ -z "$path" ]; then
		fail "bad agentvm.mounts entry '$m' (want TAG:PATH)"
	fi
	mkdir -p "$path" || fail "mkdir $path failed"
	err=$(mount -t virtiofs "$tag" "$path" 2>&1) ||
		fail "mounting virtiofs tag $tag on $path failed: ${err##*: }"
done

# --- SSH server ------------------------------------------------------------------------------
# ssh_up DIR: dropbear with the VM's host key (converted: dropbear has its own key format), keys
# only, no root. authorized_keys is written as agent, so its owner is right on any uid mapping.
ssh_up() {
	_key=$1/ssh_host_ed25519_key
	[ -r "$_key" ] || fail "agentvm.ssh is set but $_key cannot be read (the host key share is not mounted?)"
	mkdir -p /run/dropbear
	chmod 0700 /run/dropbear
	err=$(dropbearconvert openssh dropbear "$_key" /run/dropbear/ed25519 2>&1) ||
		fail "converting the SSH host key $_key failed: ${err##*: }"
	if [ -r "$1/authorized_keys" ]; then
		# shellcheck disable=SC2016 # expanded by agent's shell
		su agent -c 'umask 077 && mkdir -p "$HOME/.ssh" && cat >"$HOME/.ssh/authorized_keys"' <"$1/authorized_keys" ||
			fail "writing agent's ~/.ssh/authorized_keys failed"
	fi
	err=$(dropbear -r /run/dropbear/ed25519 -p 22 -s -g -w -P /run/dropbear.pid 2>&1) ||
		fail "the SSH server (dropbear) did not start: ${err##*: }"
}
if [ -n "$ssh" ]; then
	ssh_up "$ssh"
fi

# --- terminal resize -------------------------------------------------------------------------
# A read returns EOF while no host end is connected to the port, so the loop reopens it.
resize_loop() {
	port=$(find_port "$RESIZE_PORT" 100) || exit 0
	while :; do
		while read -r r c _; do
			is_uint "$r" && is_uint "$c" && stty -F "$CONSOLE" rows "$r" cols "$c"
		done <"$port"
		sleep 0.2
	done
}
if [ -d /sys/class/virtio-ports ]; then
	resize_loop </dev/null >/dev/null 2>&1 &
fi

# --- graceful power-off --------------------------------------------------------------------
# The host's graceful stop is ACPI's power button (QMP system_powerdown). busybox acpid runs
# /etc/acpi/PWRF/00000080 for it: hang up every process but init, as a closed terminal would,
# and kill what is left after 5 s. The command's exit then lets init report and power off.
if ls /dev/input/event* >/dev/null 2>&1; then
	mkdir -p /etc/acpi/PWRF
	printf '#!/bin/sh\nkill -HUP -1\nsleep 5\nkill -KILL -1\n' >/etc/acpi/PWRF/00000080
	chmod 0755 /etc/acpi/PWRF/00000080
	acpid -c /etc/acpi -l /dev/null </dev/null >/dev/null 2>&1 || diag "acpid did not start: the guest ignores the power button"
fi

# --- the command -----------------------------------------------------------------------------
if [ -n "$have_cmd" ]; then
	cmd=$(printf %s "$cmd_b64" | base64 -d 2>/dev/null) || fail "agentvm.cmd is not valid base64"
	[ -n "$cmd" ] || fail "agentvm.cmd is empty"
	# the environment a login shell gets from /etc/profile
	cmd=". /etc/agentvm/agent-env.sh
$cmd"
else
	cmd='exec sh -l'
fi

cd /work 2>/dev/null || cd /
# setsid -c: a new session whose controlling terminal is stdin (hvc0), so ^C on the console reaches
# the command's foreground process group. su (not -l) switches to agent with initgroups, sets HOME,
# SHELL, USER, LOGNAME from /etc/passwd, keeps the cwd, and runs `/bin/sh -c "$cmd"`.
env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin TERM="$term" \
	setsid -c su agent -c "$cmd" <>"$CONSOLE" >&0 2>&0
status=$?
# The session leader's exit hung up hvc0 (so every fd open on it is dead): reopen for diagnostics.
exec 2>"$CONSOLE"

report "agentvm-exit-status=$status"
shutdown
