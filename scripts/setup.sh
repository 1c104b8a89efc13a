#!/usr/bin/env bash
# Installs what kvmscope's demo, tests and benchmarks need on a Debian
# machine that has Go, gcc and git: QEMU, busybox for the test initramfs,
# and the decompressors for guest kernels. Idempotent; runs apt-get only when
# something is missing.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sh || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v zstd >/dev/null || need+=(zstd)
command -v lz4 >/dev/null || need+=(lz4)
command -v ld >/dev/null || need+=(binutils)
command -v strace >/dev/null || need+=(strace)
# The exporter test has a real Prometheus scrape it.
command -v prometheus >/dev/null || need+=(prometheus)
# The ioctl catalogue test regenerates its numbers from the kernel headers.
[ -r /usr/include/linux/kvm.h ] || need+=(linux-libc-dev)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's udev rule gives group kvm rw on /dev/kvm; containers often lack
# udev. Apply the same rule so an unprivileged user in group kvm (libvirt's
# libvirt-qemu is one) can run VMs, as on a normal host.
if [ -e /dev/kvm ] && [ "$(id -u)" -eq 0 ]; then
  getent group kvm >/dev/null || groupadd -r kvm
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true
fi
