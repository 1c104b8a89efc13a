#!/usr/bin/env bash
# Installs libvirt (Debian's libvirt-daemon-system) for kvmscope's libvirt
# tests and prepares what the kvmscope-qemu wrapper needs on a libvirt host
# (see docs/libvirt.md):
#   - group "kvmscope": its members may use the VMs' API sockets;
#   - /run/kvmscope, owned by libvirt-qemu (the user QEMU runs as, which
#     creates the sockets) and group kvmscope, mode 2750: setgid, so every
#     socket and event log in it belongs to group kvmscope;
#   - /etc/tmpfiles.d/kvmscope.conf, to recreate /run/kvmscope at boot on
#     systemd hosts.
# With --start it also starts virtlogd and libvirtd (as daemons, no
# systemd needed) when they are not running.
# Idempotent; runs apt-get only when something is missing; root only.
set -euo pipefail

start=0
[ "${1:-}" = "--start" ] && start=1

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-libvirt: not root; skipping (libvirt tests need root)" >&2
  exit 0
fi

if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null || ! command -v virtlogd >/dev/null; then
  echo "setup-libvirt: installing libvirt-daemon-system" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu >/dev/null
fi

getent group kvmscope >/dev/null || groupadd -r kvmscope
qemu_user=libvirt-qemu
getent passwd "$qemu_user" >/dev/null || qemu_user=root
install -d -m 2750 -o "$qemu_user" -g kvmscope /run/kvmscope
if [ -d /etc/tmpfiles.d ] && [ ! -e /etc/tmpfiles.d/kvmscope.conf ]; then
  echo "d /run/kvmscope 2750 $qemu_user kvmscope -" >/etc/tmpfiles.d/kvmscope.conf
fi

if [ $start = 1 ]; then
  # Without systemd the daemons run in the background; each writes its pid
  # file under /run and refuses to start twice.
  if ! [ -S /run/libvirt/virtlogd-sock ] || ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d
  fi
  if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    pgrep -x libvirtd >/dev/null || libvirtd -d
    for _ in $(seq 1 100); do
      virsh -c qemu:///system version >/dev/null 2>&1 && break
      sleep 0.1
    done
    virsh -c qemu:///system version >/dev/null
  fi
fi
