#!/usr/bin/env bash
# The benchmarks of issue 2, printed as a table of ratios. Every ratio is
# measured in one run with ours and its baseline interleaved, so a busy
# machine slows both alike (the spread of the slowdown ratio is printed
# too: on a loaded machine it can be wider than the 0.5% target).
#
#   scripts/bench.sh            run, print the table, exit 1 if a target is missed
#   KVMSCOPE_BENCH_REPS=N       rounds of the guest-slowdown runs (default 5)
#   KVMSCOPE_BENCH_IO=N         port-I/O exits per guest run (default 40000)
#
# Needs qemu-system-x86_64 (just setup); the KVM rows run on this machine's
# KVM, or in the nested-KVM lab where it has none (labelled "nested KVM",
# KVMSCOPE_LAB=1 forces it). The every-syscall contrast row needs strace
# (not in the lab). The raw `go test -bench` output goes to
# .cache/bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
log=.cache/bench.log

status=0
load0=$(cut -d' ' -f1-3 /proc/loadavg)
# Where /dev/kvm cannot run them (or KVMSCOPE_LAB=1) the gate defers the
# KVM benchmarks to the nested-KVM lab (docs/testing.md), which runs both
# sides of every ratio inside the same L1: its rows say "nested KVM".
rec=$PWD/.cache/bench-record.jsonl
rm -f "$rec"
KVMSCOPE_RECORD=$rec go test -run '^$' -bench '^Benchmark(GuestSlowdown|APIRegisters|RegisterWrite|GuestRead|VCPURegisters|PSKVM|Guard|ScanScheduleKVM)$' \
  -benchtime 1x -count 1 -timeout 20m ./cmd/kvmscope ./guestmem 2>&1 |
  grep -v -e "host doesn't support requested feature" -e 'terminating on signal' |
  tee "$log" >&2 || status=1
where="KVM here"
if grep -q '"where":"deferred"' "$rec" 2>/dev/null; then
  # -icount: L1's clock counts the instructions TCG executes, so both
  # sides of a ratio are measured in instructions, whatever else the host
  # does: rounds repeat to the fourth digit, and 0.5% is resolved.
  where="nested KVM, icount"
  export KVMSCOPE_LAB_ICOUNT=${KVMSCOPE_LAB_ICOUNT:-shift=0,sleep=off}
  echo "bench: KVM benchmarks deferred to the nested-KVM lab ($(grep -o '"reason":"[^"]*' "$rec" | head -1 | cut -d'"' -f4))" >&2
  export KVMSCOPE_BENCH_REPS=${KVMSCOPE_BENCH_REPS:-5}
  KVMSCOPE_LAB_FROM=$rec KVMSCOPE_LAB_OUT=$PWD/.cache/kvmlab-bench KVMSCOPE_LAB_BENCHTIME=1x KVMSCOPE_RECORD= \
    go test -count=1 -v -timeout 90m -run '^TestLab$' ./internal/kvmlab >.cache/bench-lab.log 2>&1 || {
    status=1
    grep -E -e '^kvmlab:' -e 'FAIL|panic:' .cache/bench-lab.log | head -20 >&2
  }
  grep -E '^(Benchmark|    bench_test|    [a-z_]+\.go)' .cache/kvmlab-bench/run/output.txt >&2 || true
  cat .cache/kvmlab-bench/run/output.txt >>"$log" 2>/dev/null || true
fi

awk -v where="$where" '
# Collect "Benchmark<Name>[/sub]-P  N  T ns/op  V unit  V unit ..." lines.
/^Benchmark/ {
  name = $1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
  for (i = 5; i + 1 <= NF; i += 2) m[name, $(i+1)] = $i
  seen[name] = 1
}
function has(n, u) { return (n, u) in m }
# row prints one line: ours (metric ou) and baseline (bu) in unit, the ratio
# (metric ru, printed with rfmt, with quartiles when ru-p25 exists), and
# PASS/FAIL against target when op is <= or >=; op "" is a contrast row.
function row(label, n, ou, bu, fmt, unit, ru, rfmt, op, target,   r, res, o, b, t) {
  t = (op == "" ? "contrast" : op " " target)
  if (!(n in seen) || !has(n, ru)) {
    printf "%-48s %14s %14s %22s %9s  %s\n", label, "-", "-", "-", t, "MISSING"
    if (op != "") failed = 1
    return
  }
  o = sprintf(fmt " %s", m[n, ou], unit); b = sprintf(fmt " %s", m[n, bu], unit)
  r = sprintf(rfmt, m[n, ru])
  if (has(n, ru "-p25")) r = r sprintf(" [" rfmt "," rfmt "]", m[n, ru "-p25"], m[n, ru "-p75"])
  if (op == "") res = "-"
  else if ((op == "<=" && m[n, ru] + 0 <= target + 0) || (op == ">=" && m[n, ru] + 0 >= target + 0)) res = "PASS"
  else { res = "FAIL"; failed = 1 }
  printf "%-48s %14s %14s %22s %9s  %s\n", label, o, b, r, t, res
}
END {
  printf "%-48s %14s %14s %22s %9s  %s\n", "benchmark (" where ")", "ours", "baseline", "ratio [quartiles]", "target", "result"
  n = "GuestSlowdown"
  row("guest wall time (CLI): kvmscope run / QEMU", n, "kvmscope-s", "qemu-s", "%.3f", "s", "kvmscope-ratio", "%.3f", "<=", "1.005")
  row("  fastest run / fastest run", n, "kvmscope-min-s", "qemu-min-s", "%.3f", "s", "kvmscope-min-ratio", "%.3f", "", "")
  row("guest wall time (CLI): run --policy default / QEMU", n, "policy-s", "qemu-s", "%.3f", "s", "policy-ratio", "%.3f", "<=", "1.005")
  row("  run --policy default / run (what the policy adds)", n, "policy-s", "kvmscope-s", "%.3f", "s", "policy-vs-run-ratio", "%.3f", "", "")
  row("  the same per exit (io=0 boots subtracted)", n, "policy-s", "kvmscope-s", "%.3f", "s", "policy-vs-run-exit-ratio", "%.3f", "", "")
  row("  policy start-up over run, ms (io=0 boots)", n, "policy-boot-s", "kvmscope-boot-s", "%.3f", "s", "policy-startup-ms", "%+.1f", "", "")
  row("  per exit (io=0 boot subtracted)", n, "kvmscope-s", "qemu-s", "%.3f", "s", "kvmscope-exit-ratio", "%.3f", "", "")
  row("  start-up cost, ms (io=0 boots)", n, "kvmscope-boot-s", "qemu-boot-s", "%.3f", "s", "kvmscope-startup-ms", "%+.0f", "", "")
  row("  CPU time (QEMU + tracer)", n, "kvmscope-cpu-s", "qemu-cpu-s", "%.3f", "s", "kvmscope-cpu-ratio", "%.3f", "", "")
  row("guest wall time: strace -f / plain QEMU", n, "strace-s", "qemu-s", "%.3f", "s", "strace-ratio", "%.3f", "", "")
  row("  CPU time (QEMU + strace)", n, "strace-cpu-s", "qemu-cpu-s", "%.3f", "s", "strace-cpu-ratio", "%.3f", "", "")
  row("vCPU registers: QMP / kvmscope (in-process)", "VCPURegisters", "ours-us", "qmp-us", "%.1f", "us", "speedup", "%.2f", ">=", "20")
  row("vCPU registers: QMP / kvmscope (API, HTTP)", "APIRegisters", "ours-us", "qmp-us", "%.1f", "us", "speedup", "%.2f", ">=", "20")
  row("register write (API socket): general / 8 B memory", "RegisterWrite", "regs-us", "mem-us", "%.0f", "us", "regs-ratio", "%.2f", "", "")
  row("register write (API socket): MSR / 8 B memory", "RegisterWrite", "msr-us", "mem-us", "%.0f", "us", "msr-ratio", "%.2f", "", "")
  row("register write (CLI regs set) / 8 B memory (API)", "RegisterWrite", "cli-us", "mem-us", "%.0f", "us", "cli-ratio", "%.2f", "", "")
  row("32 MiB read (in-process): process_vm_readv / memcpy", "GuestRead/procvm", "ours-GB/s", "memcpy-GB/s", "%.2f", "GB/s", "ratio", "%.3f", ">=", "0.5")
  row("32 MiB read (in-process): memfd mapping / memcpy", "GuestRead/memfd", "ours-GB/s", "memcpy-GB/s", "%.2f", "GB/s", "ratio", "%.3f", ">=", "0.5")
  row("32 MiB read (in-process): memfd RAM, procvm", "GuestRead/memfd_procvm", "ours-GB/s", "memcpy-GB/s", "%.2f", "GB/s", "ratio", "%.3f", "", "")
  row("guard: one blocked guest store (API socket, us)", "Guard", "blocked-ms", "empty-ms", "%.1f", "ms", "blocked-write-us", "%.1f", "<=", "100")
  row("guard: stores elsewhere in the slot, guarded / not", "Guard", "touch-guarded-ms", "touch-plain-ms", "%.1f", "ms", "slowdown-ratio", "%.3f", "<=", "1.005")
  if ("Guard" in seen) printf "(guard: tiny guest, %d blocked stores per run, %d stores to another page of the slot; kvmscope run --guard, timed from the API write that starts the guest to the API read that sees it done)\n", m["Guard", "stores"], m["Guard", "touches"]
  if ("GuestSlowdown" in seen) printf "\n(guest: tiny guest, %d port-I/O exits per run; ratios are medians of per-round ratios)\n", m["GuestSlowdown", "io-exits"]
  exit failed
}' "$log" || status=1

# ---------------------------------------------------------------------------
# ioctl policy (issue 9): the decision latency per trapped ioctl, on the path
# QEMU's calls take (a real traced process, the seccomp filter, the
# tracer's stop handling; tracer/enforce_bench_test.go). No target: the
# rows say what a rule costs against a call the filter lets through.
pollog=.cache/bench-policy.log
echo >&2
go test -run '^$' -bench '^BenchmarkTrappedIoctl$' -benchtime 3000x -count 1 -timeout 10m ./tracer 2>&1 | tee "$pollog" >&2 || status=1
echo
awk '
/^BenchmarkTrappedIoctl\// {
  name = $1; sub(/-[0-9]+$/, "", name); sub(/^BenchmarkTrappedIoctl\//, "", name)
  ns[name] = $3; fr[name] = $5
}
function row(label, n) {
  if (!(n in ns)) { printf "%-60s %10s %10s %9s\n", label, "-", "-", "MISSING"; failed = 1; return }
  printf "%-60s %7.1f us %10.2f %9.1f\n", label, ns[n] / 1000, fr[n], ("filter-allowed" in ns ? ns[n] / ns["filter-allowed"] : 0)
}
END {
  printf "%-60s %10s %10s %9s\n", "policy: one ioctl from a traced process (ptrace path)", "per call", "freezes", "x allowed"
  row("allowed by the seccomp filter (no stop)", "filter-allowed")
  row("decided in the tracer on the value (KVM_CREATE_VCPU)", "decided-value")
  row("decided on a pointed-to field (KVM_SET_MSRS, QEMU frozen)", "decided-pointer")
  row("  the same, 8 idle threads to freeze", "decided-pointer-8-threads")
  exit failed
}' "$pollog" || status=1

# ---------------------------------------------------------------------------
# Scan benchmarks of issue 3 (cmd/kvmscope/bench_scan_test.go): `ps` latency
# server side on Debian 6.1 guests booted (TCG) with kvmscope.procs=N extra
# processes, and first contact to first process list on a 512 MiB guest.
# Ratio = target / measured (>= 1 meets the target). KVMSCOPE_BENCH_SCAN=0
# skips them (the 5,000-process guest takes ~2 min to boot under TCG).
if [ "${KVMSCOPE_BENCH_SCAN:-1}" != 0 ]; then
  scanlog=.cache/bench-scan.log
  # The KVM rows (BenchmarkPSKVM) ran with the KVM benchmarks above.
  grep -E '^Benchmark(PSKVM|ScanScheduleKVM)' "$log" >.cache/bench-pskvm.log || true
  echo >&2
  go test -run '^$' -bench '^Benchmark(PS|FirstContact|CorePS|ScanSchedule|EventLatency)$' -benchtime 2s -count 1 -timeout 30m ./cmd/kvmscope 2>&1 |
    grep -v -e "host doesn't support requested feature" -e 'terminating on signal' |
    tee "$scanlog" >&2 || status=1
  cat .cache/bench-pskvm.log >>"$scanlog"
  echo
  awk -v kvm="$where" '
/^Benchmark/ {
  name = $1; sub(/-[0-9]+$/, "", name); sub(/^Benchmark/, "", name)
  for (i = 5; i + 1 <= NF; i += 2) m[name, $(i+1)] = $i
  seen[name] = 1
}
# row: measured metric u of benchmark n in ms against target ms (checked
# when check is set, else a contrast row).
function row(label, n, u, target, check,   v, r, res) {
  if (!(n in seen) || !((n, u) in m)) {
    printf "%-48s %12s %10s %9s  %s\n", label, "-", (check ? target " ms" : "-"), "-", "MISSING"
    if (check) failed = 1
    return
  }
  v = m[n, u]
  if (!check) { printf "%-48s %9.3f ms %10s %9s  %s\n", label, v, "-", "-", "-"; return }
  r = target / v
  res = (r >= 1 ? "PASS" : "FAIL"); if (r < 1) failed = 1
  printf "%-48s %9.3f ms %7g ms %9.3f  %s\n", label, v, target, r, res
}
function count(label, n, u) {
  if ((n, u) in m) printf "%-48s %12g %10s %9s  %s\n", label, m[n, u], "-", "-", "-"
}
# limit: measured metric u of n in unit against a ceiling target.
function limit(label, n, u, target, unit,   v, r, res) {
  if (!(n in seen) || !((n, u) in m)) {
    printf "%-48s %12s %10s %9s  %s\n", label, "-", target " " unit, "-", "MISSING"; failed = 1; return
  }
  v = m[n, u]; r = target / v
  res = (r >= 1 ? "PASS" : "FAIL"); if (r < 1) failed = 1
  printf "%-48s %9.1f %s %7g %s %9.3f  %s\n", label, v, unit, target, unit, r, res
}
# ps: the rows of one guest, each naming its path: the API socket (GET
# /v1/processes against the live `kvmscope run`), the own time of the server
# for the scan, what it read, and the CLI end to end.
function ps(label, n, target) {
  row(label ": GET /v1/processes (API socket)", n, "api-ms", target, 1)
  row("  p90 (API socket)", n, "api-p90-ms", target, 0)
  row("  the scan alone (server side)", n, "scan-ms", target, 0)
  limit("  guest memory read per scan (API socket)", n, "read-kb", 4000, "kB")
  count("  read calls per scan", n, "reads")
  count("  processes listed", n, "procs")
  row("  kvmscope ps --json (CLI, end to end)", n, "cli-ms", 60, 1)
  row("  kvmscope integrity --json (CLI, one full check)", n, "integrity-ms", 0, 0)
}
END {
  printf "%-48s %12s %10s %9s  %s\n", "scan benchmark (issue 8)", "measured", "target", "tgt/meas", "result"
  ps("ps, ~100 processes, TCG", "PS/procs=100", 1)
  ps("ps, ~100 processes, TCG, memfd RAM", "PS/procs=100-memfd", 1)
  ps("ps, ~5000 processes, TCG", "PS/procs=5000", 20)
  ps("ps, ~5000 processes, TCG, memfd RAM", "PS/procs=5000-memfd", 20)
  ps("ps, ~100 processes, " kvm, "PSKVM/procs=100", 1)
  n = "FirstContact"
  row("first contact to ps, 512 MiB guest (in-process)", n, "first-ms", 300, 1)
  row("  first GET /v1/processes of kvmscope run", n, "api-first-ms", 300, 1)
  row("  from an ELF core (in-process, reference)", n, "core-ms", 300, 0)
  limit("ps --core, 1 GiB dump, ~5000 tasks (CLI): wall", "CorePS", "core-ps-ms", 100, "ms")
  limit("  peak RSS (CLI, the child rusage)", "CorePS", "core-ps-rss-mb", 64, "MB")
  count("  processes listed (ps --core, CLI)", "CorePS", "procs")
  # Scheduled scans (issue 11): kvmscope run --scan-interval 1s with a
  # 500 ms CPU budget, read from the VM /metrics over 15 s.
  for (i = 1; i <= 3; i++) {
    n = (i == 1 ? "ScanSchedule/procs=100" : i == 2 ? "ScanSchedule/procs=5000" : "ScanScheduleKVM/procs=100")
    row("scheduled scan, " (i == 2 ? "~5000" : "~100") " processes, " (i == 3 ? kvm : "TCG") " (/metrics): CPU", n, "scan-cpu-ms", 0, 0)
    count("  guest memory read per scan (KiB)", n, "scan-read-kib")
    count("  CPU used / CPU budget", n, "budget-used-ratio")
    count("  scanning CPU / wall (duty, 0.05 allowed)", n, "duty-ratio")
    count("  scans stopped at the budget (want 0)", n, "partial-scans")
  }
  count("guest busy loop, unscanned / scanned (same run)", "ScanSchedule/procs=100", "guest-slowdown-ratio")
  count("  noise floor: the two unscanned guests", "ScanSchedule/procs=100", "unscanned-spread-ratio")
  count("guest busy loop, unscanned / scanned, " kvm, "ScanScheduleKVM/procs=100", "guest-slowdown-ratio")
  count("  noise floor: the two unscanned guests", "ScanScheduleKVM/procs=100", "unscanned-spread-ratio")
  row("event latency, scan end to events --follow (CLI)", "EventLatency", "event-latency-ms", 0, 0)
  row("  p90 (CLI)", "EventLatency", "event-latency-p90-ms", 0, 0)
  exit failed
}' "$scanlog" || status=1
fi
exit "$status"
