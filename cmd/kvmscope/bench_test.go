package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// The benchmarks of issue 2 that need the kvmscope binary (scripts/bench.sh
// prints them as a table). Ours and the baseline are measured interleaved
// in the same run; each benchmark reports both and their ratio as metrics.

// benchGuest returns QEMU and the built tiny guest, skipping when QEMU or
// KVM is missing (the gate defers it to the nested-KVM lab).
func benchGuest(b *testing.B) (qemu, kernel string) {
	b.Helper()
	testenv.Require(b, testenv.QEMU, testenv.KVM)
	qemu, _ = exec.LookPath("qemu-system-x86_64")
	var err error
	if kernel, err = testguest.Build(); err != nil {
		b.Fatalf("build tiny guest: %v", err)
	}
	return qemu, kernel
}

// envInt is the integer in environment variable name, else def.
func envInt(b *testing.B, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < 1 {
		b.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return v
}

// BenchmarkGuestSlowdown is the guest's wall time under `kvmscope run`
// against plain QEMU: the tiny guest does KVMSCOPE_BENCH_IO (default 40000)
// port-I/O exits, each a KVM_RUN return to QEMU, and exits. Runs are
// interleaved, KVMSCOPE_BENCH_REPS (default 5) rounds, in rotating order.
// For contrast the same run under `strace -f -o /dev/null`, a tracer that
// stops QEMU at every system call (KVM_RUN included), when strace is
// installed. Each round also boots the guest with io=0 plainly and under
// kvmscope, to split kvmscope's fixed start-up cost (two Go process starts,
// the stops at the VM's creation and memslot calls) from the cost per exit.
//
// Metrics: median wall and CPU seconds of each run (CPU: user+sys of the
// process and the descendants it waited for, QEMU included); the median
// and quartiles of the per-round wall ratios to plain QEMU (target <= 1.005
// for kvmscope); the same for CPU time; the per-exit ratio
// (kvmscope(io=N)-kvmscope(io=0)) / (qemu(io=N)-qemu(io=0)); the
// start-up cost in ms; and the ratio of the fastest runs.
func BenchmarkGuestSlowdown(b *testing.B) {
	qemu, kernel := benchGuest(b)
	n := envInt(b, "KVMSCOPE_BENCH_IO", 40000)
	reps := envInt(b, "KVMSCOPE_BENCH_REPS", 5)
	sock := filepath.Join(b.TempDir(), "api.sock")
	argsN := testguest.KernelArgs(kernel, 1, "kvm", fmt.Sprintf("io=%d", n))
	args0 := testguest.KernelArgs(kernel, 1, "kvm", "io=0")
	wrap := []string{kvmscopeBin, "--log-level", "error", "run", "--api", sock, "--", qemu}
	type variant struct {
		name string
		argv []string
	}
	wrapPolicy := []string{kvmscopeBin, "--log-level", "error", "run", "--policy", "default", "--api", sock, "--", qemu}
	variants := []variant{
		{"qemu", append([]string{qemu}, argsN...)},
		{"kvmscope", append(append([]string(nil), wrap...), argsN...)},
		{"qemu-boot", append([]string{qemu}, args0...)},
		{"kvmscope-boot", append(append([]string(nil), wrap...), args0...)},
		{"policy", append(append([]string(nil), wrapPolicy...), argsN...)},
		{"policy-boot", append(append([]string(nil), wrapPolicy...), args0...)},
	}
	if strace, err := exec.LookPath("strace"); err == nil {
		variants = append(variants, variant{"strace", append([]string{strace, "-f", "-o", "/dev/null", qemu}, argsN...)})
	} else {
		b.Logf("strace not installed: no every-syscall tracer row")
	}
	const (
		vQEMU = iota
		vKVMScope
		vQEMUBoot
		vKVMScopeBoot
		vPolicy
		vPolicyBoot
		vStrace
	)
	// run returns the wall and CPU time of one run.
	run := func(argv []string) (wall, cpu time.Duration) {
		cmd := exec.Command(argv[0], argv[1:]...)
		t0 := time.Now()
		err := cmd.Run()
		wall = time.Since(t0)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != testguest.ExitStatus(0) {
			b.Fatalf("%v: %v; want exit status %d (the guest finished its exits)", argv[:3], err, testguest.ExitStatus(0))
		}
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
		return wall, cpu
	}
	// Warm up: binaries, firmware and guest into the page cache.
	run(variants[vQEMUBoot].argv)
	run(variants[vKVMScopeBoot].argv)

	walls := make([][]time.Duration, len(variants))
	cpus := make([][]time.Duration, len(variants))
	ratio := map[string][]float64{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < reps; r++ {
			wall := make([]time.Duration, len(variants))
			cpu := make([]time.Duration, len(variants))
			for k := range variants {
				j := (k + r) % len(variants) // rotate who goes first
				wall[j], cpu[j] = run(variants[j].argv)
				walls[j] = append(walls[j], wall[j])
				cpus[j] = append(cpus[j], cpu[j])
			}
			add := func(name string, v float64) { ratio[name] = append(ratio[name], v) }
			add("kvmscope-ratio", wall[vKVMScope].Seconds()/wall[vQEMU].Seconds())
			add("kvmscope-cpu-ratio", cpu[vKVMScope].Seconds()/cpu[vQEMU].Seconds())
			add("kvmscope-exit-ratio", (wall[vKVMScope]-wall[vKVMScopeBoot]).Seconds()/(wall[vQEMU]-wall[vQEMUBoot]).Seconds())
			add("kvmscope-startup-ms", float64((wall[vKVMScopeBoot]-wall[vQEMUBoot]).Microseconds())/1e3)
			add("policy-ratio", wall[vPolicy].Seconds()/wall[vQEMU].Seconds())
			add("policy-exit-ratio", (wall[vPolicy]-wall[vPolicyBoot]).Seconds()/(wall[vQEMU]-wall[vQEMUBoot]).Seconds())
			// What the policy adds to kvmscope run alone.
			add("policy-vs-run-ratio", wall[vPolicy].Seconds()/wall[vKVMScope].Seconds())
			add("policy-vs-run-exit-ratio", (wall[vPolicy]-wall[vPolicyBoot]).Seconds()/(wall[vKVMScope]-wall[vKVMScopeBoot]).Seconds())
			add("policy-startup-ms", float64((wall[vPolicyBoot]-wall[vKVMScopeBoot]).Microseconds())/1e3)
			if len(variants) > vStrace {
				add("strace-ratio", wall[vStrace].Seconds()/wall[vQEMU].Seconds())
				add("strace-cpu-ratio", cpu[vStrace].Seconds()/cpu[vQEMU].Seconds())
			}
		}
	}
	b.StopTimer()
	for j, v := range variants {
		b.ReportMetric(medianDuration(walls[j]).Seconds(), v.name+"-s")
		b.ReportMetric(medianDuration(cpus[j]).Seconds(), v.name+"-cpu-s")
		b.ReportMetric(minDuration(walls[j]).Seconds(), v.name+"-min-s")
	}
	// Other work on the machine only ever adds time, so the fastest runs
	// are the least disturbed ones.
	b.ReportMetric(minDuration(walls[vKVMScope]).Seconds()/minDuration(walls[vQEMU]).Seconds(), "kvmscope-min-ratio")
	for name, vs := range ratio {
		b.ReportMetric(quantile(vs, 0.5), name)
		// The quartiles show how far the machine's noise lets the
		// median be trusted.
		b.ReportMetric(quantile(vs, 0.25), name+"-p25")
		b.ReportMetric(quantile(vs, 0.75), name+"-p75")
	}
	b.ReportMetric(float64(n), "io-exits")
}

// BenchmarkAPIRegisters is one vCPU's registers through the API (GET
// /v1/vcpus on a 1-vCPU VM: kick, sync-regs copy, JSON over the unix socket)
// against QMP `info registers` on the same running VM, parsed. Metrics:
// median µs of each and the median of the rounds' speedups (target
// >= 20).
func BenchmarkAPIRegisters(b *testing.B) {
	qemu, kernel := benchGuest(b)
	qmpSock := filepath.Join(b.TempDir(), "qmp.sock")
	c := startBenchRun(b, nil, qemu, append(testguest.KernelArgs(kernel, 1, "kvm", ""), "-qmp", "unix:"+qmpSock+",server=on,wait=off"))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	q, err := guestmem.DialQMP(ctx, qmpSock)
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	const rounds = 100
	var ours, base []time.Duration
	var speedups []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			var vcpus []api.VCPU
			t0 := time.Now()
			if err := c.Get(ctx, "/v1/vcpus", &vcpus); err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			out, err := q.HMP(ctx, "info registers")
			if err != nil {
				b.Fatal(err)
			}
			cpus, err := guestmem.ParseInfoRegisters(out)
			t2 := time.Now()
			if err != nil || len(cpus) != 1 || len(vcpus) != 1 {
				b.Fatalf("got %d vCPUs from the API, %d from QMP (%v)", len(vcpus), len(cpus), err)
			}
			if vcpus[0].CR3 != testguest.PML4GPA || cpus[0].CR3 != testguest.PML4GPA {
				b.Fatalf("CR3 %#x (API), %#x (QMP); want the tiny guest's %#x", vcpus[0].CR3, cpus[0].CR3, testguest.PML4GPA)
			}
			ours = append(ours, t1.Sub(t0))
			base = append(base, t2.Sub(t1))
			speedups = append(speedups, t2.Sub(t1).Seconds()/t1.Sub(t0).Seconds())
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(medianDuration(ours).Nanoseconds())/1e3, "ours-us")
	b.ReportMetric(float64(medianDuration(base).Nanoseconds())/1e3, "qmp-us")
	// The median of the rounds' ratios, which a busy machine disturbs
	// less than a ratio of medians.
	b.ReportMetric(quantile(speedups, 0.5), "speedup")
}

// startBenchRun starts kvmscope run (with runFlags) of qemu with args,
// stopped when the benchmark ends, and returns its API client once the
// tiny guest is ready.
func startBenchRun(b *testing.B, runFlags []string, qemu string, args []string) *api.Client {
	b.Helper()
	sock := filepath.Join(b.TempDir(), "api.sock")
	argv := append(append([]string{"--log-level", "error", "run", "--api", sock}, runFlags...), "--", qemu)
	cmd := exec.Command(kvmscopeBin, append(argv, args...)...)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	b.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	c := api.NewClient(sock)
	ready := url.Values{"gpa": {fmt.Sprintf("%#x", testguest.ReadyGPA)}, "len": {"8"}}
	for deadline := time.Now().Add(60 * time.Second); ; {
		body, err := c.GetRaw(context.Background(), "/v1/memory?"+ready.Encode())
		if err == nil && len(body) == 8 && binary.LittleEndian.Uint64(body) == testguest.ReadyValue {
			return c
		}
		if time.Now().After(deadline) {
			b.Fatalf("the tiny guest did not get ready under kvmscope run: %v", err)
		}
		select {
		case <-done:
			b.Fatal("kvmscope run exited early")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func medianDuration(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func minDuration(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	m := ds[0]
	for _, d := range ds[1:] {
		m = min(m, d)
	}
	return m
}

// quantile q (0..1) of fs, nearest rank.
func quantile(fs []float64, q float64) float64 {
	if len(fs) == 0 {
		return 0
	}
	s := append([]float64(nil), fs...)
	sort.Float64s(s)
	return s[int(q*float64(len(s)-1)+0.5)]
}
