#!/bin/sh
# /init of the agent guest's initramfs (busybox; copied in by build-agent.sh).
#
# Loads the modules, mounts the read-only root image (erofs on the first virtio disk, /dev/vda)
# under a tmpfs overlay, so the guest may write anywhere and nothing but the shares persists, and
# hands over to the image's /usr/lib/agentvm/init (init.sh), which keeps the built-in guest's
# contract with the host (supervisor/guest/init.sh). A failure here is reported the same way:
# "agentvm-guest-error=REASON" on the org.agentvm.status port, then power-off.
PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/kmsg 2>&1

fail() {
	echo "agentvm-init: $*"
	for f in /sys/class/virtio-ports/*/name; do
		[ "$(cat "$f" 2>/dev/null)" = org.agentvm.status ] || continue
		d=${f%/name}
		echo "agentvm-guest-error=$*" >"/dev/${d##*/}"
	done
	poweroff -f
	echo o >/proc/sysrq-trigger
	while :; do sleep 3600; done
}

for m in $(cat /lib/modules/load-order); do
	insmod "/lib/modules/$m.ko" || fail "insmod $m failed in the agent guest's initramfs"
done
tries=200 # 10 s
while [ ! -b /dev/vda ]; do
	[ "$tries" -gt 0 ] || fail "the root image disk /dev/vda did not appear within 10 s"
	tries=$((tries - 1))
	sleep 0.05
done
mkdir -p /lower /rw
mount -t erofs -o ro /dev/vda /lower || fail "mounting the root image (/dev/vda, erofs) failed"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mounting the tmpfs for the root overlay failed"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
	fail "mounting the root overlay failed"
[ -x /newroot/usr/lib/agentvm/init ] || fail "the root image has no /usr/lib/agentvm/init"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /usr/lib/agentvm/init
