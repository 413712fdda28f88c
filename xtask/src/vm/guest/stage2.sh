#!/bin/sh
# Stage 2 of the test-bed guest, PID 1 on the overlay root, run by the host's own /bin/sh.
# Sets up the environment every VM job shares (kernel filesystems, CAN modules, loopback), mounts
# the results share, runs the job the host wrote there (job.sh) and powers off. The job's exit
# status goes to the share's `status` file: the host trusts that, not the console.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
LANG=C.UTF-8
VCAN_TESTBED=1
VMTEST_RESULTS=/run/vmtest
export PATH HOME LANG VCAN_TESTBED VMTEST_RESULTS

# busybox is static: under TCG it starts much faster than util-linux's mount, whose shared
# libraries are each looked up and paged in over 9p (about 0.1 s per call, 1 s per boot).
mount() {
    busybox mount "$@"
}
mkdir() {
    busybox mkdir "$@"
}

say() {
    echo "vmtest: $*"
}

halt() {
    sync
    # busybox's poweroff -f calls reboot(2) directly; the host's poweroff may be systemctl,
    # which needs systemd. sysrq is the last resort.
    busybox poweroff -f 2>/dev/null
    echo o >/proc/sysrq-trigger
    sleep 60
}

fail() {
    say "stage 2: $*"
    # Also on the share (once mounted): the console is not a reliable channel.
    echo "$*" >>"$VMTEST_RESULTS/setup-error" 2>/dev/null
    halt
}

mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
modules=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vmtest.modules=*) modules=${arg#*=} ;;
    esac
done

mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs -o nosuid devtmpfs /dev || fail "cannot mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run || fail "cannot mount /run"
# A workspace checked out under /tmp must stay visible: there /tmp keeps the overlay (writable
# too), elsewhere the guest gets a clean tmpfs.
case "$modules" in
    /tmp/*) ;;
    *) mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || fail "cannot mount /tmp" ;;
esac
# /var/run is a symlink to /run on Debian; `ip netns` keeps its namespaces here.
mkdir -p /run/netns /run/lock /run/vmtest
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup || fail "cannot mount cgroup2"
mount -t bpf -o mode=700 bpffs /sys/fs/bpf || fail "cannot mount bpffs"
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
echo vcan-testbed >/proc/sys/kernel/hostname

# Mounted early so that later failures are recorded there too.
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=512000 results /run/vmtest ||
    fail "cannot mount the results share"

# The host's /lib/modules has no modules for this kernel: borrow the extracted package's, so
# plain modprobe (and the kernel's own request_module) work.
read -r release </proc/sys/kernel/osrelease
[ -n "$modules" ] || fail "no vmtest.modules= on the kernel command line"
mkdir -p "/lib/modules/$release"
mount --bind "$modules" "/lib/modules/$release" || fail "cannot bind-mount $modules"
# can-gw is never autoloaded, the others are loaded up front so the first test does not pay.
modprobe -a can can_raw can_dev vcan vxcan can_gw can_bcm sch_ingress cls_bpf virtio_rng ||
    fail "modprobe failed"
ip link set lo up || fail "cannot bring up lo"

read -r uptime _ </proc/uptime
echo "$uptime" >/run/vmtest/boot-seconds
# The host starts streaming the console after this line.
say "running job"
cd / || fail "cannot cd /"
/bin/sh /run/vmtest/job.sh </dev/null
status=$?
# The host stops streaming here.
say "job finished"
echo "$status" >/run/vmtest/status
dmesg >/run/vmtest/dmesg.txt 2>&1
halt
