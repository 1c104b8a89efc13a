#!/usr/bin/env bash
# The demo: boot Debian's cloud kernel with a busybox initramfs under
# `kvmscope run`, then list the guest's processes from outside, with no
# agent in the guest and no kernel profile.
#
# Accelerator: KVM when it really runs guests here, else TCG. Some hosts
# (nested or emulated KVM backends) offer /dev/kvm but execute guest kernel
# code far too slowly to boot Linux; the tiny test guest tells us which
# (KVMSCOPE_DEMO_ACCEL=kvm|tcg overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=bin/kvmscope
guests=${KVMSCOPE_GUESTS:-.cache/guests}
work=$(mktemp -d /tmp/kvmscope-demo.XXXXXX)
sock=$work/demo.sock
cleanup() {
  [ -n "${run_pid:-}" ] && kill -TERM "$run_pid" 2>/dev/null && wait "$run_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

accel=${KVMSCOPE_DEMO_ACCEL:-}
if [ -z "$accel" ]; then
  accel=tcg
  if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    # Count how fast the tiny guest's ring-0 loop runs under KVM: hardware
    # virtualization does >1e8 increments a second, an emulating backend ~1e5.
    testdata/tinyguest/build.sh "$work/tiny" >/dev/null
    fw=(); [ -f /usr/share/qemu/qboot.rom ] && fw=(-bios /usr/share/qemu/qboot.rom)
    "$bin" --log-level warn run --api "$work/probe.sock" -- qemu-system-x86_64 -nodefaults -machine pc "${fw[@]}" \
      -accel kvm -m 64M -display none -serial none -no-reboot -kernel "$work/tiny/tinyguest.elf" 2>/dev/null &
    probe=$!
    rate=0
    for _ in $(seq 50); do
      [ -S "$work/probe.sock" ] && break; sleep 0.1
    done
    sleep 1
    c1=$("$bin" mem --api "$work/probe.sock" --gpa 0x10b040 --len 8 --raw 2>/dev/null | od -An -tu8 | tr -d ' ' || echo 0)
    sleep 1
    c2=$("$bin" mem --api "$work/probe.sock" --gpa 0x10b040 --len 8 --raw 2>/dev/null | od -An -tu8 | tr -d ' ' || echo 0)
    kill -TERM $probe 2>/dev/null; wait $probe 2>/dev/null || true
    rate=$(( ${c2:-0} - ${c1:-0} ))
    if [ "$rate" -gt 10000000 ]; then accel=kvm; fi
    echo "demo: KVM runs guest kernel code at ~$rate loop iterations/s: using $accel" >&2
  fi
fi

echo "demo: booting $(basename "$(readlink -f "$guests/debian/vmlinuz")") (Debian 6.1 cloud) under kvmscope run, accel=$accel" >&2
"$bin" --log-level warn run --api "$sock" -- qemu-system-x86_64 -accel "$accel" -m 512 -smp 2 \
  -display none -serial "file:$work/serial.log" -monitor none -no-reboot -name demo \
  -kernel "$guests/debian/vmlinuz" -initrd "$guests/initramfs.cpio.gz" -append "console=ttyS0 panic=-1" \
  2>"$work/run.log" &
run_pid=$!

# Wait until the guest's init has started its processes.
for _ in $(seq 240); do
  grep -q KVMSCOPE-READY "$work/serial.log" 2>/dev/null && break
  if ! kill -0 "$run_pid" 2>/dev/null; then
    echo "demo: QEMU ended early:" >&2; cat "$work/run.log" >&2; exit 1
  fi
  sleep 0.5
done

echo; echo "== kvmscope kernel (found in guest memory, no profile) =="
"$bin" kernel --api "$sock" | sed -n '1,9p'
echo; echo "== kvmscope ps --tree (read from the guest kernel's task list) =="
"$bin" ps --api "$sock" --tree
echo; echo "== kvmscope ps =="
"$bin" ps --api "$sock"
echo; echo "== kvmscope integrity (the system-call dispatch, checked) =="
"$bin" integrity --api "$sock"
echo; echo "== kvmscope report (the built-in rules: hidden processes and modules, tampered dispatch) =="
"$bin" report --api "$sock"
