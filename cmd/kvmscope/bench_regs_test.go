package main

import (
	"context"
	"fmt"
	"os/exec"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/session"
)

// BenchmarkRegisterWrite is one verified register write on the paths a
// user takes, on the tiny guest under KVM (spin mode, whose loop uses no
// register written): PUT /v1/registers over the API socket for general
// registers (pause, kvm_run sync regs, resume, fresh read back) and for an
// MSR (KVM_SET_MSRS injected with QEMU frozen, read back twice), and
// `kvmscope regs set` from the shell; against an 8-byte PUT /v1/memory
// (pause, write, read back, resume) in the same rounds. Metrics: median
// µs of each, and the medians of the rounds' ratios to the memory write.
func BenchmarkRegisterWrite(b *testing.B) {
	qemu, kernel := benchGuest(b)
	c := startBenchRun(b, []string{"--allow-write"}, qemu, testguest.KernelArgs(kernel, 1, "kvm", ""))
	sock := c.Socket
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	put := func(body map[string]string) time.Duration {
		var w session.RegisterWrite
		t0 := time.Now()
		if err := c.PutJSON(ctx, "/v1/registers?vcpu=0", body, &w); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	const rounds = 50
	var gen, msr, cli, mem []time.Duration
	var genR, msrR, cliR []float64
	gpa := fmt.Sprintf("/v1/memory?gpa=%#x", testguest.StatusGPA+0x800)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			t0 := time.Now()
			if err := c.Put(ctx, gpa, []byte(fmt.Sprintf("round%03d", r))); err != nil {
				b.Fatal(err)
			}
			m := time.Since(t0)
			g := put(map[string]string{"r15": fmt.Sprintf("%#x", r)})
			x := put(map[string]string{"kernel_gs_base": fmt.Sprintf("%#x", 0xffff888000000000+uint64(r)<<12)})
			t0 = time.Now()
			if out, err := exec.Command(kvmscopeBin, "regs", "set", "--api", sock, "--vcpu", "0", fmt.Sprintf("r14=%d", r)).CombinedOutput(); err != nil {
				b.Fatalf("kvmscope regs set: %v: %s", err, out)
			}
			l := time.Since(t0)
			mem, gen, msr, cli = append(mem, m), append(gen, g), append(msr, x), append(cli, l)
			genR, msrR, cliR = append(genR, g.Seconds()/m.Seconds()), append(msrR, x.Seconds()/m.Seconds()), append(cliR, l.Seconds()/m.Seconds())
		}
	}
	b.StopTimer()
	us := func(ds []time.Duration) float64 { return float64(medianDuration(ds).Nanoseconds()) / 1e3 }
	b.ReportMetric(us(mem), "mem-us")
	b.ReportMetric(us(gen), "regs-us")
	b.ReportMetric(us(msr), "msr-us")
	b.ReportMetric(us(cli), "cli-us")
	b.ReportMetric(quantile(genR, 0.5), "regs-ratio")
	b.ReportMetric(quantile(msrR, 0.5), "msr-ratio")
	b.ReportMetric(quantile(cliR, 0.5), "cli-ratio")
}
