#!/bin/sh
# /init of the Soft-RoCE guest built by tests/rxe/run. It brings up rxe0 on a dummy netdev,
# runs /job.sh (written per run by the host, appended to the cached initramfs as a second
# cpio archive) and powers off. Everything the host parses is a line starting with "RXE-":
#   RXE-SETUP <ok|failed: reason>   rxe0 is (not) usable
#   RXE-RESULT <name> <exit status> one per step of the job
#   RXE-DONE                        the job ran to its end (missing => the guest died or hung)
export PATH=/usr/bin:/usr/sbin
export HOME=/root
mkdir -p /proc /sys /dev /tmp /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
# Kernel messages would interleave with the job's output on the serial console.
echo 1 > /proc/sys/kernel/printk

die() {
  echo "RXE-SETUP failed: $*"
  dmesg | tail -n 30
  echo "RXE-DONE"
  poweroff -f
}

# Order matters and is verified: without crc32_generic rdma_rxe cannot add a link.
for m in $(cat /etc/rxe/modules.order); do
  insmod "/usr/lib/rxe-modules/$m" || die "insmod $m"
done

ip link set lo up || die "lo up"
ip link add d0 type dummy || die "ip link add d0 type dummy"
ip link set d0 up || die "d0 up"
ip addr add 127.0.0.2/8 dev d0 || die "ip addr add 127.0.0.2/8 dev d0"
rdma link add rxe0 type rxe netdev d0 || die "rdma link add rxe0 type rxe netdev d0"

# The IPv4-mapped RoCE v2 GID of 127.0.0.2; its index is whatever the kernel gave it, so look
# it up (the table fills asynchronously after the address is added).
RXE_GID_INDEX=
tries=0
while [ -z "$RXE_GID_INDEX" ] && [ $tries -lt 50 ]; do
  for g in /sys/class/infiniband/rxe0/ports/1/gids/*; do
    i=${g##*/}
    case "$(cat "$g" 2>/dev/null)" in
      *:ffff:7f00:0002)
        t=$(cat /sys/class/infiniband/rxe0/ports/1/gid_attrs/types/$i 2>/dev/null)
        case "$t" in *v2*) RXE_GID_INDEX=$i ;; esac ;;
    esac
  done
  [ -n "$RXE_GID_INDEX" ] || { sleep 0.1; tries=$((tries + 1)); }
done
[ -n "$RXE_GID_INDEX" ] || die "no RoCE v2 GID ::ffff:127.0.0.2 on rxe0"
export RXE_GID_INDEX
export RXE_DEVICE=rxe0
export RXE_ADDRESS=127.0.0.2
echo "RXE-SETUP ok gid_index=$RXE_GID_INDEX cpus=$(nproc) kernel=$(uname -r)"

cd /root
sh /job.sh
echo "RXE-DONE"
sync
poweroff -f
