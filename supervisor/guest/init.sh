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

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
# The kernel could not open /dev/console (hvc0 is a module): give init defined stdio. Until hvc0
# exists, diagnostics go to the kernel log.
exec </dev/null >/dev/null 2>/dev/kmsg
# diag, report, fail, shutdown and the setup steps below: the contract both guests keep
. /usr/lib/agentvm/init-lib.sh

# --- modules ---------------------------------------------------------------------------------
if [ -r /lib/modules/load-order ]; then
	MODULES=$(cat /lib/modules/load-order)
fi
for m in $MODULES; do
	[ -e "/lib/modules/$m.ko" ] || continue
	err=$(insmod "/lib/modules/$m.ko" 2>&1) || fail "insmod $m failed: ${err##*: }"
done

# --- the contract's setup (init-lib.sh) -----------------------------------------------------
wait_for_console
mount_runtime_dirs
read_cmdline
set_agent_ids
if [ -n "$net" ]; then
	net_up "$net"
fi
write_proxy_env
mount_shares

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

start_resize_loop
start_power_button

# --- the command -----------------------------------------------------------------------------
if [ -n "$have_cmd" ]; then
	decode_command
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
