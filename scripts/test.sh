#!/usr/bin/env bash
# Runs every test (go test -v into .cache/test.log), prints the package
# results, skipped tests with their reasons and failures, and fails when
# tests that must run here were skipped (scripts/check-skips.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
log=.cache/test.log
go test -v -count=1 -timeout 40m ./... >"$log" 2>&1
status=$?
# Skips with their reasons (go test -v prints a reason before the SKIP
# line when it streams, after it otherwise).
grep -E -B1 -A1 -e '^\s*--- SKIP' "$log" || true
if [ $status -ne 0 ]; then
  echo "== failures (full output in $log) =="
  grep -E -B2 -A25 '^\s*--- FAIL|^panic:' "$log" | grep -v '"level":"debug"' | head -300
fi
grep -E '^(ok |FAIL|\?   )' "$log"
scripts/check-skips.sh "$log" || status=1
echo "tests: $(grep -cE -e '^\s*--- PASS' "$log") passed, $(grep -cE -e '^\s*--- FAIL' "$log") failed, $(grep -cE -e '^\s*--- SKIP' "$log") skipped"
exit $status
