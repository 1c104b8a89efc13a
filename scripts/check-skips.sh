#!/usr/bin/env bash
# Fails when tests that need /dev/kvm or the guest kernels were skipped on a
# machine that should have run them (CI sets KVMSCOPE_REQUIRE_KVM=1).
set -euo pipefail
log=$1
if [ "${KVMSCOPE_REQUIRE_KVM:-}" = 1 ]; then
  if grep -E -- '--- SKIP' -A2 "$log" | grep -qE 'KVM|/dev/kvm|guest kernels|not fetched|qemu-system'; then
    echo "check-skips: tests that CI must run were skipped:" >&2
    grep -E -- '--- SKIP' -A2 "$log" >&2
    exit 1
  fi
fi
