#!/usr/bin/env bash
# Runs tests in the nested-KVM lab (internal/kvmlab) even where /dev/kvm
# works: the host runs the matching tests with KVMSCOPE_LAB=1, so the gate
# defers every KVM test to the lab, then one L1 boot runs the deferred ones.
#
#   scripts/lab.sh [PACKAGE [RUN]]     e.g. scripts/lab.sh ./cmd/kvmscope '^TestKVMCapture$'
#
# Tests of the pattern that need no KVM run on the host as usual. Logs:
# .cache/kvmlab/run/{console.log,results.log}.
set -euo pipefail
cd "$(dirname "$0")/.."
pkg=${1:-./...}
run=${2:-.}
mkdir -p .cache
rec=$PWD/.cache/lab-record-in.jsonl
rm -f "$rec"
echo "lab: host side: go test -run '$run' $pkg (KVM tests deferred)" >&2
KVMSCOPE_LAB=1 KVMSCOPE_RECORD=$rec go test -count=1 -run "$run" $(go list "$pkg" | grep -v '/internal/kvmlab$')
echo "lab: $(grep -c '"where":"deferred"' "$rec" 2>/dev/null || true) deferred to the lab" >&2
KVMSCOPE_LAB_FROM=$rec go test -count=1 -v -timeout 50m -run '^TestLab$' ./internal/kvmlab
