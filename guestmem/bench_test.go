//go:build linux && amd64

package guestmem

import (
	"context"
	"math/rand"
	"sort"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
)

// The benchmarks of issue 2 that run in-process (scripts/bench.sh prints
// them as a table). Each measures ours and its baseline interleaved in the
// same run, and reports both and their ratio as metrics, so that a loaded
// machine slows both alike.

// benchReadSize is the size of one bulk read.
const benchReadSize = 32 << 20

// benchReadGPA is where the bulk read starts: inside the tiny guest's RAM
// slot above 1 MiB, clear of its code and pattern pages.
const benchReadGPA = 16 << 20

// BenchmarkGuestRead compares one 32 MiB read of guest RAM with copy() of a
// 32 MiB buffer: through process_vm_readv (anonymous guest RAM, QEMU's
// default) and through our read-only mapping of QEMU's memfd
// (memory-backend-memfd), and on that same memfd VM through
// process_vm_readv for contrast. Metrics: GB/s of each path and of memcpy,
// and each path's ratio to memcpy (target >= 0.5).
func BenchmarkGuestRead(b *testing.B) {
	for _, memfd := range []bool{false, true} {
		g := startLiveGuest(b, guestOptions{memfd: memfd})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		// Pause the vCPU: the spinning guest would take a core from the
		// copy loops on a small machine.
		if _, err := g.qmp.Execute(ctx, "stop", nil); err != nil {
			b.Fatal(err)
		}
		cancel()
		// Fill the range with data, so every page is present in QEMU (an
		// untouched anonymous page reads as the shared zero page, which is
		// always in cache and would flatter process_vm_readv).
		fill := make([]byte, benchReadSize)
		rand.New(rand.NewSource(2)).Read(fill)
		if _, err := g.live.WriteAt(fill, benchReadGPA); err != nil {
			b.Fatal(err)
		}
		pid, slots := g.tr.VM().Pid(), g.live.slots()
		if memfd {
			regs, err := g.live.MemfdRegions()
			if err != nil || len(regs) == 0 {
				b.Fatalf("memfd guest RAM not mapped: %+v, %v", regs, err)
			}
			benchReads(b, "memfd", g.live.ReadAt, fill)
			benchReads(b, "memfd_procvm", func(p []byte, gpa int64) (int, error) {
				return readRanges(pid, slots, p, gpa)
			}, fill)
		} else {
			benchReads(b, "procvm", g.live.ReadAt, fill)
		}
		g.stop(b)
	}
}

// benchReads runs sub-benchmark name: rounds of one read through read and
// one copy() of the same size, interleaved; it checks every read against
// want.
func benchReads(b *testing.B, name string, read func([]byte, int64) (int, error), want []byte) {
	b.Run(name, func(b *testing.B) {
		dst := make([]byte, benchReadSize)
		src := make([]byte, benchReadSize)
		copy(src, want)
		// Warm up both: fault in our buffers and, for the memfd path, our
		// mapping's page tables.
		if _, err := read(dst, benchReadGPA); err != nil {
			b.Fatal(err)
		}
		copy(dst, src)
		const rounds = 40
		var ours, base []time.Duration
		var ratios []float64
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			for r := 0; r < rounds; r++ {
				// Alternate which goes first; compare within the round.
				var o, m time.Duration
				if r%2 == 0 {
					o = timeRead(b, read, dst)
					m = timeCopy(dst, src)
				} else {
					m = timeCopy(dst, src)
					o = timeRead(b, read, dst)
				}
				ours = append(ours, o)
				base = append(base, m)
				ratios = append(ratios, m.Seconds()/o.Seconds())
			}
		}
		b.StopTimer()
		if _, err := read(dst, benchReadGPA); err != nil || string(dst) != string(want) {
			b.Fatalf("read of %d bytes at %#x does not match what was written (err %v)", benchReadSize, benchReadGPA, err)
		}
		gbps := func(d time.Duration) float64 { return float64(benchReadSize) / d.Seconds() / 1e9 }
		b.ReportMetric(gbps(median(ours)), "ours-GB/s")
		b.ReportMetric(gbps(median(base)), "memcpy-GB/s")
		// Throughput ratio: the median of the rounds' ratios, which a
		// machine busy with other work disturbs less than a ratio of
		// medians.
		sort.Float64s(ratios)
		b.ReportMetric(ratios[len(ratios)/2], "ratio")
	})
}

func timeRead(b *testing.B, read func([]byte, int64) (int, error), dst []byte) time.Duration {
	t0 := time.Now()
	if _, err := read(dst, benchReadGPA); err != nil {
		b.Fatal(err)
	}
	return time.Since(t0)
}

func timeCopy(dst, src []byte) time.Duration {
	t0 := time.Now()
	copy(dst, src)
	return time.Since(t0)
}

// BenchmarkVCPURegisters compares one fresh register sample of a running
// vCPU (tracer.VM.Registers: kick with SIGUSR1, copy kvm_run's sync regs at
// the signal stop) with QMP `info registers` on the same VM, parsed.
// Metrics: median µs of each and the median of the rounds' speedups
// (target >= 20).
func BenchmarkVCPURegisters(b *testing.B) {
	g := startLiveGuest(b, guestOptions{})
	defer g.stop(b)
	vm := g.tr.VM()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const rounds = 200
	var ours, base []time.Duration
	var speedups []float64
	stale := 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			t0 := time.Now()
			s, err := vm.Registers(ctx, 0)
			if err != nil {
				b.Fatal(err)
			}
			t1 := time.Now()
			out, err := g.qmp.HMP(ctx, "info registers")
			if err != nil {
				b.Fatal(err)
			}
			cpus, err := ParseInfoRegisters(out)
			t2 := time.Now()
			if err != nil || len(cpus) != 1 {
				b.Fatalf("info registers: %v (%d CPUs)", err, len(cpus))
			}
			if !s.Fresh {
				stale++
			}
			// Both must see the guest running its own code in long mode.
			if c := cpuFromKVM(0, s.Regs); c.CR3 != testguest.PML4GPA || c.RIP < testguest.CodeStart || c.RIP >= testguest.CodeEnd || c.Mode() != "long" {
				b.Fatalf("kvmscope sample %+v: not the tiny guest's state", c)
			}
			if cpus[0].CR3 != testguest.PML4GPA {
				b.Fatalf("QMP sample %+v: not the tiny guest's state", cpus[0])
			}
			ours = append(ours, t1.Sub(t0))
			base = append(base, t2.Sub(t1))
			speedups = append(speedups, t2.Sub(t1).Seconds()/t1.Sub(t0).Seconds())
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(median(ours).Nanoseconds())/1e3, "ours-us")
	b.ReportMetric(float64(median(base).Nanoseconds())/1e3, "qmp-us")
	// The median of the rounds' ratios (see benchReads).
	sort.Float64s(speedups)
	b.ReportMetric(speedups[len(speedups)/2], "speedup")
	b.ReportMetric(float64(stale)/float64(len(ours)), "stale-fraction")
}

// median of ds (which it sorts).
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds[len(ds)/2]
}
