#!/bin/sh
# modprobe-vcan: the vcan-plugin DaemonSet's init container. Loads the kernel modules the plugin
# needs into the node's kernel (containers share it), using the host's /lib/modules mounted
# read-only. It never installs anything on the host: when the node's kernel has no vcan module
# it explains what to install and fails, so the pod shows Init:Error and this log says why.
#
# Environment:
#   VCAN_REQUIRED_MODULES  modules that must load (default: vcan); empty to never fail
#   VCAN_OPTIONAL_MODULES  modules loaded if present (default: can can_raw)
#   MODULES_DIR            where modprobe finds the host's modules (default: /lib/modules; only
#                          used to explain failures)
#   SYS_MODULE_DIR         where loaded modules show up (default: /sys/module)
set -u

required=${VCAN_REQUIRED_MODULES-vcan}
optional=${VCAN_OPTIONAL_MODULES-can can_raw}
modules_dir=${MODULES_DIR:-/lib/modules}
sys_module_dir=${SYS_MODULE_DIR:-/sys/module}
release=$(uname -r)

log() {
    printf 'modprobe-vcan: %s\n' "$*"
}

# Loads one module; prints why not and returns 1 when it cannot.
load() {
    module=$1
    if [ -d "$sys_module_dir/$module" ]; then
        log "$module: already loaded"
        return 0
    fi
    if out=$(modprobe "$module" 2>&1); then
        log "$module: loaded"
        return 0
    fi
    log "$module: cannot load: ${out:-modprobe failed}"
    return 1
}

explain_missing() {
    module=$1
    cat <<EOF

=====================================================================================
vcan-plugin cannot work on this node: the kernel module "$module" could not be loaded
into the node's kernel ($release).
EOF
    if [ ! -d "$modules_dir/$release" ]; then
        cat <<EOF

$modules_dir/$release does not exist in this container, so the node's module tree is
not visible: check that the DaemonSet mounts the host's /lib/modules (volume
"lib-modules"), and that the node keeps its modules there.
EOF
    elif [ -n "${out:-}" ] && printf '%s' "$out" | grep -q -i 'not permitted'; then
        cat <<EOF

The kernel refused to load it (operation not permitted): the init container lacks
CAP_SYS_MODULE, or the node forbids loading modules (kernel.modules_disabled=1, kernel
lockdown, or a module-signing policy). Load the module on the node itself instead, e.g.
with /etc/modules-load.d/vcan.conf containing "$module", and restart this pod.
EOF
    else
        cat <<EOF

The node's kernel has no "$module" module (CONFIG_CAN_VCAN), or it is not installed:
  * Ubuntu (also AKS, EKS and GKE Ubuntu node images): the CAN modules are in the
    extra-modules package. Install it ON THE NODE, e.g. in the node image or with
        apt-get install linux-modules-extra-$release
    and restart this pod.
  * Debian, Fedora, Arch, openSUSE and most other distribution kernels usually ship vcan:
    check that the module files for $release exist under $modules_dir.
  * Custom or minimal kernels (some cloud-optimised images): rebuild with
    CONFIG_CAN=m, CONFIG_CAN_RAW=m and CONFIG_CAN_VCAN=m.
EOF
    fi
    cat <<EOF

Until then pods requesting vcan interfaces cannot start on this node. To keep the
plugin off nodes without vcan, label the others socketcan.io/vcan-node=true and
deploy with the component deploy/components/node-selector.
=====================================================================================
EOF
}

status=0
for module in $optional; do
    load "$module" || log "$module: optional, continuing"
done
for module in $required; do
    if ! load "$module"; then
        explain_missing "$module" >&2
        status=1
    fi
done
[ "$status" -eq 0 ] && log "done: the node's kernel ($release) has what vcan-plugin needs"
exit "$status"
