#!/bin/sh
# Stage 1 of the test-bed guest, run by busybox from the initramfs: mount the host's root
# read-only over virtio-9p, put an overlay with a tmpfs upper on top so the guest can write, and
# switch into it. Stage 2 is a host file named on the kernel command line (vmtest.stage2=PATH),
# run by the host's own /bin/sh.

fail() {
    echo "vmtest: init: $*"
    # Nothing to fall back to: stop now so the host reports the failure instead of timing out.
    poweroff -f
    sleep 60
}

mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev

for module in $(cat /modules/order); do
    insmod "/modules/$module.ko" || fail "insmod $module failed"
done

stage2=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmtest.stage2=*) stage2=${arg#*=} ;;
    esac
done
[ -n "$stage2" ] || fail "no vmtest.stage2= on the kernel command line"

# insmod returns once the driver is registered; give the device probe a moment if needed.
tries=0
until mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 hostroot /lower; do
    tries=$((tries + 1))
    [ "$tries" -lt 20 ] || fail "cannot mount the host root (9p tag hostroot)"
    sleep 0.1
done
mount -t tmpfs -o mode=755 tmpfs /rw || fail "cannot mount the tmpfs for the overlay"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
    fail "cannot mount the overlay root"
[ -f "/newroot$stage2" ] || fail "stage 2 script $stage2 is not visible in the guest"

# Stage 2 mounts its own; these would stay pinned in the discarded initramfs.
umount /dev
umount /proc
exec switch_root /newroot /bin/sh "$stage2"
