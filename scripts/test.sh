#!/usr/bin/env bash
# Runs every test in two steps and checks where each ran:
#  1. the host's tests (go test -json into .cache/test.json); the gate
#     (internal/testenv) writes where each KVM/QEMU/guest/libvirt test ran,
#     or why not, to the run record .cache/record.jsonl;
#  2. the nested-KVM lab (go test ./internal/kvmlab into
#     .cache/lab-test.json): its own tests, and TestLab, which boots L1 once
#     and runs in it every test the record deferred to the lab (no usable
#     /dev/kvm here, or KVMSCOPE_LAB=1);
# then internal/testenv/runrecord prints failures, skips and the joined
# record (.cache/run-record.json), and fails when a test failed or, with
# KVMSCOPE_REQUIRE=1 (CI), when a test that must run ran nowhere.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
rm -f .cache/record.jsonl .cache/test.json .cache/lab-test.json .cache/run-record.json
export KVMSCOPE_RECORD=$PWD/.cache/record.jsonl
status=0
pkgs=$(go list ./... | grep -v '/internal/kvmlab$')
echo "== step 1: host tests ($(echo "$pkgs" | wc -l) packages) =="
go test -json -count=1 -timeout 40m $pkgs >.cache/test.json 2>.cache/test.stderr || status=1
cat .cache/test.stderr
echo "== step 2: the nested-KVM lab =="
KVMSCOPE_LAB_FROM=$KVMSCOPE_RECORD KVMSCOPE_RECORD= \
  go test -json -count=1 -timeout 50m ./internal/kvmlab >.cache/lab-test.json 2>.cache/lab-test.stderr || status=1
cat .cache/lab-test.stderr
require=()
[ "${KVMSCOPE_REQUIRE:-}" = 1 ] && require=(-require)
go run ./internal/testenv/runrecord "${require[@]}" || status=1
exit $status
