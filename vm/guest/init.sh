#!/bin/busybox sh
# Xenon compute VM: the initramfs' /init (busybox). Loads the virtio, ext4, 9p and virtio-mem
# drivers, brings up user-mode networking, mounts the image's root file system (the read-only
# virtio disk /dev/vda) and this compute's data share (9p `xenon.data`, at /xenon/share), then
# hands over to the agent in the image. Nothing else of the host's file system reaches the guest.
/bin/busybox mkdir -p /bin /proc /sys /dev
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "xenon-init: loading drivers"
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "xenon-init: insmod $m failed"
done < /lib/modules/order
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
  || echo "xenon-init: no network"
mkdir -p /newroot
if ! mount -t ext4 -o ro,noload /dev/vda /newroot; then
  echo "xenon-init: cannot mount the root file system"; sleep 1; poweroff -f
fi
mount -t tmpfs -o mode=0755,size=64m run /newroot/run
mount -t tmpfs -o mode=1777,size=256m tmp /newroot/tmp
mount --move /dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
# The data share may be absent (a warm VM waits for its assignment with an empty one).
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 xenon.data /newroot/xenon/share \
  || echo "xenon-init: no data share"
exec switch_root /newroot /usr/local/sbin/xenon-agent
