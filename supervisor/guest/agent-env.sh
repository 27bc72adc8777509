# The agent's environment in the built-in guest, as claude-microvm's guest sets it up on login.
# Sourced (as the agent, in busybox sh) by /etc/profile and before a `-- CMD`; build-assets.sh copies
# it to /etc/agentvm/agent-env.sh.
#
#   $HOME/.microvm-env       written by the host (0600): DIRENV_ALLOW, ENABLE_CRI, the flavor's API
#                            key. Exported: the agent reads its key from the environment.
#   $HOME/.microvm-devshell  the cached `nix print-dev-env` (or devenv's), loaded with DIRENV_ALLOW=1;
#                            its PATH comes first, the guest's after (claude-microvm does the same).
#   /run/agentvm/net.env     what the network setup (init.sh, net_up) tells the agent, e.g. a proxy;
#                            last, so nothing above overrides it.
# shellcheck shell=sh

if [ -f "$HOME/.microvm-env" ]; then
	set -a
	# shellcheck disable=SC1091 # written by the host
	. "$HOME/.microvm-env"
	set +a
fi

# The dev shell is bash (print-dev-env's output), this is busybox sh: it is loaded in a subshell,
# whose resulting environment comes back through `export -p`. A syntax error there ends only the
# subshell (a failed `.` would end this shell), and its hooks run once.
agentvm_devshell() {
	_cache=$HOME/.microvm-devshell
	if [ ! -s "$_cache" ]; then
		echo "agentvm: the dev shell cache $_cache is missing or empty: DIRENV_ALLOW=1 on the host caches it" >&2
		[ -f "$_cache.err" ] && cat "$_cache.err" >&2
		return 0
	fi
	_dump=$(mktemp) || return 0
	# shellcheck disable=SC1090 # the project's dev shell
	(. "$_cache" >&2 && export -p >"$_dump")
	if [ -s "$_dump" ]; then
		_path=$PATH
		# shellcheck disable=SC1090 # export -p's output
		. "$_dump"
		case :$PATH: in
		*:"$_path":*) ;; # nix's own output appends the PATH it started with
		*) PATH=$PATH:$_path ;;
		esac
		export PATH
	else
		echo "agentvm: loading the dev shell $_cache failed in busybox sh; the guest runs without it" >&2
	fi
	rm -f "$_dump"
	unset _cache _dump _path
}
if [ "${DIRENV_ALLOW:-0}" = 1 ]; then
	agentvm_devshell
fi
unset -f agentvm_devshell

if [ -f /run/agentvm/net.env ]; then
	set -a
	. /run/agentvm/net.env
	set +a
fi
