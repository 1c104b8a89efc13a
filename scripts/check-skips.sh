#!/usr/bin/env bash
# Fails when tests that need /dev/kvm, QEMU, libvirt or the guest kernels
# were skipped on a machine that must run them (CI sets
# KVMSCOPE_REQUIRE_KVM=1). Reads the output of go test -v.
set -euo pipefail
log=$1
[ "${KVMSCOPE_REQUIRE_KVM:-}" = 1 ] || exit 0
skips=$(grep -E -B1 -A1 -e '^\s*--- SKIP' "$log" || true)
if printf '%s\n' "$skips" | grep -qiE 'kvm|qemu|guest|libvirt|just guests|not installed'; then
  echo "check-skips: tests that CI must run were skipped:" >&2
  printf '%s\n' "$skips" >&2
  exit 1
fi
