package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// BenchmarkGuard measures the guard on the path users take: `kvmscope
// run --guard --allow-write` with the tiny guest, the page protected
// through POST /v1/integrity/guard, and the guest's work timed from the
// API write that starts it (the go word) to the API read that sees it
// done (GET /v1/memory, polled).
//
//   - blocked-write-us: the guest makes KVMSCOPE_BENCH_GUARD_N (default
//     2000) stores into the protected page; minus the same run with no
//     store, divided by N: the guest time of one blocked store, from the
//     store to the next instruction (target <= 100 us).
//   - slowdown-ratio: the guest makes KVMSCOPE_BENCH_TOUCH (default
//     200000) stores into another page of the protected memslot, with the
//     guard on against the same VM setup with nothing protected (target
//     <= 1.005).
//
// Variants are interleaved in rotating order, KVMSCOPE_BENCH_REPS rounds.
func BenchmarkGuard(b *testing.B) {
	qemu, kernel := benchGuest(b)
	n := envInt(b, "KVMSCOPE_BENCH_GUARD_N", 2000)
	touch := envInt(b, "KVMSCOPE_BENCH_TOUCH", 200000)
	reps := envInt(b, "KVMSCOPE_BENCH_REPS", 5)
	type variant struct {
		name    string
		cmdline string
		protect bool
	}
	variants := []variant{
		{"blocked", fmt.Sprintf("guard=%d", n), true},
		{"empty", "guard=0", true},
		{"touch-guarded", fmt.Sprintf("guard=0 touch=%d", touch), true},
		{"touch-plain", fmt.Sprintf("guard=0 touch=%d", touch), false},
	}
	// run times one guest's work, go to done, through the API socket.
	run := func(v variant) time.Duration {
		sock := filepath.Join(b.TempDir(), "api.sock")
		argv := append([]string{"--log-level", "error", "run", "--guard", "--allow-write", "--api", sock, "--", qemu},
			testguest.KernelArgs(kernel, 1, "kvm", v.cmdline)...)
		cmd := exec.Command(kvmscopeBin, argv...)
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}()
		c := api.NewClient(sock)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		deadline := time.Now().Add(60 * time.Second)
		for {
			if raw, err := c.GetRaw(ctx, fmt.Sprintf("/v1/memory?gpa=%#x&len=8", testguest.ReadyGPA)); err == nil && binary.LittleEndian.Uint64(raw) == testguest.ReadyValue {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%s: the guest did not get ready", v.name)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if v.protect {
			var g map[string]any
			req := api.GuardRequest{Ranges: []api.GuardRange{{GPA: testguest.PatternGPA, Size: 4096}}}
			if err := c.PostJSON(ctx, "/v1/integrity/guard", req, &g); err != nil {
				b.Fatalf("%s: protect: %v", v.name, err)
			}
		}
		t0 := time.Now()
		if err := c.Put(ctx, fmt.Sprintf("/v1/memory?gpa=%#x", testguest.GoGPA), binary.LittleEndian.AppendUint64(nil, 1)); err != nil {
			b.Fatal(err)
		}
		for {
			raw, err := c.GetRaw(ctx, fmt.Sprintf("/v1/memory?gpa=%#x&len=8", testguest.GuardDoneGPA))
			if err != nil {
				b.Fatal(err)
			}
			if binary.LittleEndian.Uint64(raw) == 1 {
				return time.Since(t0)
			}
			if time.Since(t0) > 5*time.Minute {
				b.Fatalf("%s: the guest did not finish", v.name)
			}
		}
	}
	times := make([][]time.Duration, len(variants))
	run(variants[1]) // warm up: binaries, firmware and guest into the page cache
	var perWrite, slowdown []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < reps; r++ {
			t := make([]time.Duration, len(variants))
			for k := range variants {
				j := (k + r) % len(variants)
				t[j] = run(variants[j])
				times[j] = append(times[j], t[j])
			}
			perWrite = append(perWrite, float64((t[0]-t[1]).Microseconds())/float64(n))
			slowdown = append(slowdown, t[2].Seconds()/t[3].Seconds())
		}
	}
	b.StopTimer()
	for j, v := range variants {
		b.ReportMetric(medianDuration(times[j]).Seconds()*1e3, v.name+"-ms")
	}
	b.ReportMetric(quantile(perWrite, 0.5), "blocked-write-us")
	b.ReportMetric(quantile(perWrite, 0.25), "blocked-write-us-p25")
	b.ReportMetric(quantile(perWrite, 0.75), "blocked-write-us-p75")
	b.ReportMetric(quantile(slowdown, 0.5), "slowdown-ratio")
	b.ReportMetric(quantile(slowdown, 0.25), "slowdown-ratio-p25")
	b.ReportMetric(quantile(slowdown, 0.75), "slowdown-ratio-p75")
	b.ReportMetric(float64(n), "stores")
	b.ReportMetric(float64(touch), "touches")
}
