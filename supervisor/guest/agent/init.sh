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
#   - the setup both guests share is guest/init-lib.sh (installed as /usr/lib/agentvm/init-lib.sh);
#   - ENABLE_CRI=podman (or docker: the same podman) starts podman's API service as root with
#     its storage in the cri-storage share (/var/lib/containers); the agent talks to it through
#     /run/podman/podman.sock (CONTAINER_HOST, DOCKER_HOST).
PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
umask 022

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
exec </dev/null >/dev/null 2>/dev/kmsg
# diag, report, fail, shutdown and the setup steps below: the contract both guests keep
# shellcheck source=../init-lib.sh
. /usr/lib/agentvm/init-lib.sh

# --- the contract's setup (init-lib.sh) -----------------------------------------------------
wait_for_console
mount_runtime_dirs
read_cmdline
set_agent_ids
if [ -n "$net" ]; then net_up "$net"; fi
write_proxy_env
mount_shares
start_resize_loop
start_power_button

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
	decode_command
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
