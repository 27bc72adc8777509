#!/bin/bash
# Build the agentvm-supervise built-in guest: build-assets.sh OUT_DIR
#
# Produces, without root and without installing anything (it only downloads .debs and unpacks them):
#   OUT_DIR/vmlinuz     Debian 12's linux-image-6.1.0-*-cloud-amd64 kernel (LZ4, boots fast under TCG)
#   OUT_DIR/initrd.gz   busybox initramfs: busybox-static, the virtio/virtiofs/virtio-net modules,
#                       /init = init.sh (with /usr/lib/agentvm/init-lib.sh), /etc/agentvm/agent-env.sh
#                       = agent-env.sh, and Debian 12's
#                       dropbear (with the glibc and libraries it links) for guests on a tap network
#   OUT_DIR/virtiofsd   wrapper running Debian 13's virtiofsd 1.13 with Debian 13's glibc (OUT_DIR/trixie)
#   OUT_DIR/VERSIONS    key=value lines: kernel, busybox, virtiofsd, glibc versions
#
# Packages come from private apt configurations (own sources, lists and cache in the build dir) so
# nothing of Debian 13 ever reaches the system's apt state and no `apt-get update` as root is needed.
# The mirror is the one /etc/apt uses for Debian (override: AGENTVM_DEBIAN_MIRROR,
# AGENTVM_DEBIAN_SECURITY_MIRROR). The build happens in a temp dir next to OUT_DIR, renamed into
# place at the end, so a half build never looks complete. Everything in OUT_DIR is world-readable.
set -euo pipefail

PROG=agentvm-supervise
STEPS=5
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MODULES=(virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio virtio_console fuse virtiofs virtio_net button evdev)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

step() { echo "$PROG: [$1/$STEPS] $2" >&2; }

# die MESSAGE [LOGFILE]: one paragraph naming what failed and what to do, then the tail of a log.
die() {
	echo "$PROG: error: $1" | fold -s -w 100 >&2
	if [ -n "${2:-}" ] && [ -s "$2" ]; then
		echo "$PROG: last lines of the output:" >&2
		tail -n 8 "$2" | sed 's/^/    /' >&2
	fi
	exit 1
}

usage() {
	echo "usage: $0 OUT_DIR" >&2
	echo "Builds the agentvm-supervise guest (vmlinuz, initrd.gz, virtiofsd, VERSIONS) into OUT_DIR." >&2
	exit 2
}

[ $# -eq 1 ] || usage
case $1 in -h | --help) usage ;; esac

need() { # need COMMAND PACKAGE
	command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install $2 (as root), then run this again."
}
for pair in apt-get:apt apt-cache:apt dpkg:dpkg dpkg-deb:dpkg cpio:cpio gzip:gzip find:findutils \
	sort:coreutils realpath:coreutils mktemp:coreutils awk:mawk sed:sed fold:coreutils; do
	need "${pair%%:*}" "${pair#*:}"
done
[ -r "$KEYRING" ] || die "$KEYRING not found: apt-get install debian-archive-keyring (as root), then run this again."
for f in init.sh init-lib.sh agent-env.sh; do
	[ -r "$HERE/$f" ] || die "$HERE/$f not found: build-assets.sh must stay next to init.sh, init-lib.sh and agent-env.sh."
done
[ "$(dpkg --print-architecture)" = amd64 ] || die "this builds an x86_64 guest and needs an amd64 Debian host (this is $(dpkg --print-architecture))."

umask 022
OUT=$(realpath -m -- "$1")
case $OUT in
*[!A-Za-z0-9/._+@=-]*) die "OUT_DIR '$OUT' contains characters this script does not handle (spaces, quotes, colons...): choose a plainer path." ;;
/) die "OUT_DIR must not be /." ;;
esac
PARENT=$(dirname "$OUT")
mkdir -p "$PARENT" || die "cannot create $PARENT: choose an OUT_DIR in a writable place."
[ -w "$PARENT" ] || die "$PARENT is not writable by $(id -un): choose an OUT_DIR in a writable place."

TMP=$(mktemp -d "$PARENT/.$(basename "$OUT").build.XXXXXX") || die "cannot create a temp dir in $PARENT."
OLD=
cleanup() {
	rm -rf -- "$TMP"
	if [ -n "$OLD" ]; then rm -rf -- "$OLD"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
trap 'echo "$PROG: error: build-assets.sh failed unexpectedly at line $LINENO ($BASH_COMMAND); please report this." >&2' ERR
chmod 0755 "$TMP"
STAGE=$TMP/out    # becomes OUT_DIR
WORK=$TMP/work    # scratch: apt state, .debs, unpacked packages
mkdir -p "$STAGE" "$WORK"

# --- private apt configurations -------------------------------------------------------------
# First Debian archive URI (…/debian, …/debian-security) configured on this machine.
system_uri() { # system_uri REGEX
	{
		for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
			[ -r "$f" ] || continue
			awk '$1 == "deb" { for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; continue } print $i; break } }' "$f"
		done
		for f in /etc/apt/sources.list.d/*.sources; do
			[ -r "$f" ] || continue
			awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f"
		done
	} 2>/dev/null | grep -E "$1" | head -n 1 || true
}
MIRROR=${AGENTVM_DEBIAN_MIRROR:-$(system_uri '^(https?|mirror\+[a-z]+)://[^ ]*/debian/?$')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
SECURITY=${AGENTVM_DEBIAN_SECURITY_MIRROR:-$(system_uri '^(https?|mirror\+[a-z]+)://[^ ]*/debian-security/?$')}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
SECURITY=${SECURITY%/}

# apt_setup NAME SOURCES-LINES: a private apt root under $WORK/apt-NAME; sets APT_OPTS_NAME.
apt_setup() {
	local d=$WORK/apt-$1
	mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/state" "$d/preferences.d" "$d/debs"
	printf '%s\n' "$2" >"$d/sources.list"
	: >"$d/status"
	local -a opts=(
		-o "Dir::Etc::SourceList=$d/sources.list"
		-o "Dir::Etc::SourceParts=/dev/null"
		-o "Dir::Etc::Preferences=/dev/null"
		-o "Dir::Etc::PreferencesParts=$d/preferences.d"
		-o "Dir::State=$d/state"
		-o "Dir::State::Lists=$d/lists"
		-o "Dir::State::Status=$d/status"
		-o "Dir::Cache=$d/cache"
		-o "Acquire::Languages=none"
		-o "APT::Get::List-Cleanup=false"
		-o "Debug::NoLocking=true"
	)
	# as root apt would drop to _apt, which cannot write into our 0700 temp dir
	if [ "$(id -u)" = 0 ]; then opts+=(-o "APT::Sandbox::User=root"); fi
	local -n ref="APT_OPTS_$1"
	# shellcheck disable=SC2034 # a nameref: this assigns the global APT_OPTS_NAME
	ref=("${opts[@]}")
}
S="[signed-by=$KEYRING]"
apt_setup bookworm "deb $S $MIRROR bookworm main
deb $S $MIRROR bookworm-updates main
deb $S $SECURITY bookworm-security main"
apt_setup trixie "deb $S $MIRROR trixie main"

apt_update() { # apt_update NAME WHAT
	local -n o=APT_OPTS_$1
	apt-get "${o[@]}" -q update >"$WORK/apt-$1.log" 2>&1 || die "apt-get update of a private $2 index \
failed (mirror $MIRROR$([ "$1" = bookworm ] && echo " and $SECURITY")): the mirror must be reachable \
(check the network or proxy, or set AGENTVM_DEBIAN_MIRROR / AGENTVM_DEBIAN_SECURITY_MIRROR), and \
$KEYRING must know its signing keys (apt-get install debian-archive-keyring as root to update it)." "$WORK/apt-$1.log"
	# apt-get update exits 0 when some index failed to download ("W: Failed to fetch"): every
	# index of this private configuration is needed
	if grep -qE '^(Err:|E: |W: Failed to fetch|W: Some index files failed)' "$WORK/apt-$1.log" ||
		! compgen -G "$WORK/apt-$1/lists/*_Packages*" >/dev/null; then
		die "apt-get update of a private $2 index could not fetch every package list (mirror \
$MIRROR$([ "$1" = bookworm ] && echo " and $SECURITY")): check the network or proxy, or set \
AGENTVM_DEBIAN_MIRROR / AGENTVM_DEBIAN_SECURITY_MIRROR." "$WORK/apt-$1.log"
	fi
}

apt_download() { # apt_download NAME WHAT PACKAGE...
	local name=$1 what=$2
	shift 2
	local -n o=APT_OPTS_$name
	(cd "$WORK/apt-$name/debs" && apt-get "${o[@]}" -q download "$@") >"$WORK/apt-$name-dl.log" 2>&1 ||
		die "apt-get download of $what ($*) failed: the mirror $MIRROR must be reachable (check the \
network or proxy, or set AGENTVM_DEBIAN_MIRROR)." "$WORK/apt-$name-dl.log"
}

deb_of() { # deb_of NAME PACKAGE: path of the downloaded .deb
	local f
	f=$(compgen -G "$WORK/apt-$1/debs/$2_*.deb" | head -n 1) || true
	[ -n "$f" ] || die "the .deb of $2 is missing after apt-get download: report this as a bug."
	echo "$f"
}

deb_version() { dpkg-deb -f "$1" Version; }

# --- 1. package indexes ----------------------------------------------------------------------
step 1 "updating private apt indexes for Debian 12 and Debian 13 ($MIRROR)..."
apt_update bookworm "Debian 12 (bookworm)"
apt_update trixie "Debian 13 (trixie)"

# --- 2. kernel and busybox -------------------------------------------------------------------
# shellcheck disable=SC2154 # set by apt_setup through a nameref
KPKG=$(apt-cache "${APT_OPTS_bookworm[@]}" depends linux-image-cloud-amd64 2>"$WORK/apt-cache.log" |
	awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }') || true
[ -n "$KPKG" ] || die "could not find the current Debian 12 cloud kernel (apt-cache depends \
linux-image-cloud-amd64 named no linux-image-6.1.0-*-cloud-amd64 package)." "$WORK/apt-cache.log"
# the SSH server: dropbear is small, and with its libraries the initramfs grows by about 1.5 MB
SSH_PKGS=(dropbear-bin libtomcrypt1 libtommath1 libgmp10 libcrypt1 zlib1g libc6)
# iputils' ping: busybox's needs a raw socket (root); this one uses ICMP datagram sockets, which
# init.sh opens to the agent user (net.ipv4.ping_group_range), so `ping` works on tap networks
PING_PKGS=(iputils-ping libcap2 libidn2-0 libunistring2)
step 2 "downloading Debian 12 $KPKG, busybox-static and dropbear..."
apt_download bookworm "the Debian 12 kernel, busybox, dropbear and ping" "$KPKG" busybox-static \
	"${SSH_PKGS[@]}" "${PING_PKGS[@]}"
KDEB=$(deb_of bookworm "$KPKG")
BBDEB=$(deb_of bookworm busybox-static)
DBDEB=$(deb_of bookworm dropbear-bin)

# --- 3. virtiofsd ----------------------------------------------------------------------------
step 3 "downloading Debian 13 virtiofsd and libc6..."
apt_download trixie "Debian 13 virtiofsd" virtiofsd libc6
VDEB=$(deb_of trixie virtiofsd)
LDEB=$(deb_of trixie libc6)
mkdir -p "$STAGE/trixie"
dpkg -x "$VDEB" "$STAGE/trixie/vfs" || die "dpkg -x of $VDEB failed (disk full?)."
dpkg -x "$LDEB" "$STAGE/trixie/libc" || die "dpkg -x of $LDEB failed (disk full?)."
ARCHLIB=usr/lib/x86_64-linux-gnu
[ -x "$STAGE/trixie/vfs/usr/libexec/virtiofsd" ] || die "the Debian 13 virtiofsd package has no \
usr/libexec/virtiofsd: its layout changed, update build-assets.sh."
[ -e "$STAGE/trixie/libc/$ARCHLIB/ld-linux-x86-64.so.2" ] || die "the Debian 13 libc6 package has \
no $ARCHLIB/ld-linux-x86-64.so.2: its layout changed, update build-assets.sh."

# --- 4. initramfs ----------------------------------------------------------------------------
step 4 "building the initramfs..."
K=$WORK/kernel
dpkg -x "$KDEB" "$K" || die "dpkg -x of $KDEB failed (disk full?)."
KVER=$(compgen -G "$K/lib/modules/*" | head -n 1) || true
KVER=${KVER##*/}
if [ -z "$KVER" ] || [ ! -f "$K/boot/vmlinuz-$KVER" ]; then
	die "$KPKG has no boot/vmlinuz matching its lib/modules: its layout changed, update build-assets.sh."
fi
cp "$K/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"

B=$WORK/busybox
dpkg -x "$BBDEB" "$B" || die "dpkg -x of $BBDEB failed (disk full?)."
[ -x "$B/bin/busybox" ] || die "the busybox-static package has no bin/busybox: update build-assets.sh."

R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,lib/modules,dev,proc,sys,tmp,run,root,mnt,work,home/agent,var/lib/containers}
cp "$B/bin/busybox" "$R/bin/busybox"
# one symlink per applet, where busybox itself would install it
"$B/bin/busybox" --list-full >"$WORK/applets" || die "cannot run the unpacked busybox-static: is this an x86_64 host?"
while read -r a; do
	if [ -z "$a" ] || [ -e "$R/$a" ] || [ -L "$R/$a" ]; then continue; fi
	mkdir -p "$R/$(dirname "$a")"
	ln -s /bin/busybox "$R/$a"
done <"$WORK/applets"
[ -L "$R/bin/sh" ] || die "busybox-static has no sh applet: update build-assets.sh."

# dropbear and dropbearconvert (the host key comes in OpenSSH's format) with the shared libraries
# they link, at the paths their ELF interpreter and the default library path look in
D=$WORK/dropbear
for p in "${SSH_PKGS[@]}" "${PING_PKGS[@]}"; do
	dpkg -x "$(deb_of bookworm "$p")" "$D" || die "dpkg -x of the Debian 12 package $p failed (disk full?)."
done
[ -x "$D/usr/sbin/dropbear" ] && [ -x "$D/usr/bin/dropbearconvert" ] ||
	die "the dropbear-bin package has no usr/sbin/dropbear or usr/bin/dropbearconvert: update build-assets.sh."
cp "$D/usr/sbin/dropbear" "$R/usr/sbin/dropbear"
cp "$D/usr/bin/dropbearconvert" "$R/usr/bin/dropbearconvert"
[ -x "$D/bin/ping" ] || die "the iputils-ping package has no bin/ping: update build-assets.sh."
rm -f "$R/bin/ping" # busybox's applet link: it needs a raw socket
cp "$D/bin/ping" "$R/bin/ping"
mkdir -p "$R/lib/x86_64-linux-gnu" "$R/lib64"
for lib in ld-linux-x86-64.so.2 libc.so.6 libcrypt.so.1 libz.so.1 libtomcrypt.so.1 libtommath.so.1 libgmp.so.10 \
	libcap.so.2 libidn2.so.0 libunistring.so.2; do
	f=$(find "$D" -name "$lib" \( -type f -o -type l \) -print -quit)
	[ -n "$f" ] || die "$lib is in none of ${SSH_PKGS[*]} ${PING_PKGS[*]}: their layout changed, update build-assets.sh."
	cp -L "$f" "$R/lib/x86_64-linux-gnu/$lib"
done
ln -s /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$R/lib64/ld-linux-x86-64.so.2"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$R/etc/nsswitch.conf"

MODDIR=$K/lib/modules/$KVER
MODS_IN=() # load order: every module after the modules it depends on
declare -A MOD_SEEN=()
is_builtin() { grep -qE "/$1\.ko(\.[a-z]+)?\$" "$MODDIR/modules.builtin" 2>/dev/null; }
add_module() { # add_module NAME: copy NAME.ko (uncompressed) and its dependencies, in load order
	local m=$1 f dep deps
	[ -z "${MOD_SEEN[$m]:-}" ] || return 0
	MOD_SEEN[$m]=1
	is_builtin "$m" && return 0 # built in: nothing to load
	f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) -print -quit)
	[ -n "$f" ] || return 0 # absent: the kernel does without it
	case $f in
	*.ko) cp "$f" "$R/lib/modules/$m.ko" ;;
	*.xz) need xz xz-utils && xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
	*.zst) need zstd zstd && zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
	*.gz) gzip -dc "$f" >"$R/lib/modules/$m.ko" ;;
	esac
	# the .modinfo section holds "depends=a,b"; module names there use _ like the file names
	deps=$(tr '\0' '\n' <"$R/lib/modules/$m.ko" | LC_ALL=C sed -n 's/^depends=//p' | tr ',' ' ')
	for dep in $deps; do add_module "$dep"; done
	MODS_IN+=("$m")
}
for m in "${MODULES[@]}"; do add_module "$m"; done
for m in virtio_console virtiofs virtio_net; do
	[ -e "$R/lib/modules/$m.ko" ] || is_builtin "$m" ||
		die "$KPKG has neither a $m module nor $m built in: the guest cannot work with it."
done
printf '%s\n' "${MODS_IN[@]}" >"$R/lib/modules/load-order"

cp "$HERE/init.sh" "$R/init"
mkdir -p "$R/usr/lib/agentvm"
cp "$HERE/init-lib.sh" "$R/usr/lib/agentvm/init-lib.sh"
mkdir -p "$R/etc/agentvm"
cp "$HERE/agent-env.sh" "$R/etc/agentvm/agent-env.sh"
cat >"$R/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
agent:x:1000:1000:agent:/home/agent:/bin/sh
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
tty:x:5:
agent:x:1000:
EOF
printf '/bin/sh\n/bin/ash\n' >"$R/etc/shells"
cat >"$R/etc/profile" <<'EOF'
PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
. /etc/agentvm/agent-env.sh
EOF
: >"$R/etc/fstab"
chmod -R u+rwX,go+rX,go-w "$R"
chmod 0755 "$R" "$R/init" "$R/bin/busybox"
chmod 0700 "$R/root"
chmod 1777 "$R/tmp"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) 2>"$WORK/cpio.log" |
	gzip -9n >"$STAGE/initrd.gz" || die "building the initramfs with cpio failed." "$WORK/cpio.log"

# --- 5. wrapper, versions, install -----------------------------------------------------------
step 5 "verifying Debian 13 virtiofsd and installing into $OUT..."
LIBPATH_TAIL=/lib/x86_64-linux-gnu
write_wrapper() { # write_wrapper FILE ROOT
	cat >"$1" <<EOF
#!/bin/sh
# Debian 13's virtiofsd with Debian 13's glibc (it needs glibc >= 2.39), written by build-assets.sh.
exec $2/trixie/libc/$ARCHLIB/ld-linux-x86-64.so.2 --library-path $2/trixie/libc/$ARCHLIB:$LIBPATH_TAIL $2/trixie/vfs/usr/libexec/virtiofsd "\$@"
EOF
	chmod 0755 "$1"
}
missing_libs() { # libraries virtiofsd needs from this system besides glibc
	local l
	for l in libseccomp.so.2:libseccomp2 libcap-ng.so.0:libcap-ng0 libgcc_s.so.1:libgcc-s1; do
		[ -e "/lib/x86_64-linux-gnu/${l%%:*}" ] || [ -e "/usr/lib/x86_64-linux-gnu/${l%%:*}" ] || echo -n "${l#*:} "
	done
}
# run WRAPPER --version; prints the version, or returns 1
vfs_version() {
	local v
	v=$("$1" --version 2>"$WORK/virtiofsd.log") && [[ $v == virtiofsd\ * ]] || return 1
	echo "${v#virtiofsd }"
}
vfs_failed() { # vfs_failed WRAPPER
	local m
	m=$(missing_libs)
	die "running Debian 13's virtiofsd ($1 --version) failed${m:+: apt-get install ${m% } (as root)}." "$WORK/virtiofsd.log"
}
# check it from the temp dir first: a broken build must not replace a working OUT_DIR
write_wrapper "$STAGE/virtiofsd" "$STAGE"
VFSVER=$(vfs_version "$STAGE/virtiofsd") || vfs_failed "$STAGE/virtiofsd"
write_wrapper "$STAGE/virtiofsd" "$OUT"

cat >"$STAGE/VERSIONS" <<EOF
kernel=$KVER
kernel_package=$KPKG $(deb_version "$KDEB")
busybox=$(deb_version "$BBDEB")
dropbear=$(deb_version "$DBDEB")
virtiofsd=$VFSVER
virtiofsd_package=virtiofsd $(deb_version "$VDEB")
glibc_package=libc6 $(deb_version "$LDEB")
modules=${MODS_IN[*]}
mirror=$MIRROR
EOF

chmod -R u+rwX,go+rX,go-w "$STAGE"
chmod 0755 "$STAGE"

# rename into place: a previous OUT_DIR is moved aside first (rename cannot replace a non-empty dir)
# and put back if the new one cannot take its place
restore_previous() {
	if [ -n "$OLD" ] && [ -e "$OLD/prev" ] && [ ! -e "$OUT" ]; then mv -T -- "$OLD/prev" "$OUT" || true; fi
}
if [ -e "$OUT" ] || [ -L "$OUT" ]; then
	OLD=$(mktemp -d "$PARENT/.$(basename "$OUT").old.XXXXXX")
	mv -T -- "$OUT" "$OLD/prev" || die "cannot move the previous $OUT aside (is it yours?)."
fi
if ! mv -T -- "$STAGE" "$OUT"; then
	restore_previous
	die "cannot rename the build into $OUT."
fi
# the last step: the installed wrapper, with its final paths, must work
if ! v=$(vfs_version "$OUT/virtiofsd") || [ "$v" != "$VFSVER" ]; then
	rm -rf -- "$OUT" # never leave a build that looks complete but is not
	restore_previous
	vfs_failed "$OUT/virtiofsd"
fi
echo "$PROG: built $KVER, busybox $(deb_version "$BBDEB"), virtiofsd $VFSVER in $OUT" >&2
