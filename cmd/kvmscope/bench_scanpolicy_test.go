package main

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testenv"
)

// BenchmarkScanSchedule is the cost of scheduled scans (issue 11) on the
// path users take: `kvmscope run --scan-interval 1s` with a budget
// (--scan-max-cpu 500ms, --scan-max-bytes 64 MiB) and the default duty
// cycle, on Debian under TCG with about 100 and 5,000 processes, read
// from the VM's own /metrics over a 15 s window:
//   - scan-cpu-ms: CPU time of one scheduled scan (mean over the window);
//   - scan-read-kib: guest memory one scan read;
//   - budget-used-ratio: scan-cpu over the CPU budget (how far under it
//     the scan stays);
//   - duty-ratio: scanning CPU time over wall time (the share of one core);
//   - partial-scans: scans stopped at the budget in the window (want 0).
//
// On the 100-process guest it also measures what scanning costs the
// guest: /init's busy loop (kvmscope.spin=1) prints a tick every 500
// iterations, and guest-slowdown-ratio is its rate without scans (the
// mean of a guest booted before and one after) over its rate with them,
// measured in the same run; unscanned-spread-ratio, the two unscanned
// guests' rates over each other, is the noise floor it must be read
// against (TCG guests booted one after another differ by more than
// scanning costs).
func BenchmarkScanSchedule(b *testing.B) {
	for _, c := range []scheduleCase{
		{"procs=100", "tcg", 0, 512, true},
		{"procs=5000", "tcg", 4900, 1024, false},
	} {
		b.Run(c.name, func(b *testing.B) { benchSchedule(b, c) })
	}
}

// BenchmarkScanScheduleKVM is BenchmarkScanSchedule's 100-process guest
// under KVM (the nested-KVM lab here), where the guest's speed is not
// TCG's.
func BenchmarkScanScheduleKVM(b *testing.B) {
	b.Run("procs=100", func(b *testing.B) {
		testenv.Require(b, testenv.FastKVM)
		benchSchedule(b, scheduleCase{"procs=100", "kvm", 0, 512, true})
	})
}

type scheduleCase struct {
	name         string
	accel        string
	extra, memMB int
	slowdown     bool
}

func benchSchedule(b *testing.B, c scheduleCase) {
	const window = 15 * time.Second
	policy := []string{"--scan-interval", "1s", "--scan-max-cpu", "500ms", "--scan-max-bytes", strconv.Itoa(64 << 20)}
	tickRate := func(run []string) (float64, *scanGuest) {
		sg := bootScanGuestWith(b, scanBoot{accel: c.accel, extra: c.extra, memMB: c.memMB, spin: true, run: run})
		time.Sleep(3 * time.Second) // past the first scans of the boot
		n0, t0 := strings.Count(sg.g.Serial(), "KVMSCOPE-TICK"), time.Now()
		time.Sleep(window)
		n1 := strings.Count(sg.g.Serial(), "KVMSCOPE-TICK")
		return float64(n1-n0) / time.Since(t0).Seconds(), sg
	}
	var off []float64
	if c.slowdown {
		r, sg := tickRate(nil)
		sg.g.Close()
		off = append(off, r)
	}
	sg := bootScanGuestWith(b, scanBoot{accel: c.accel, extra: c.extra, memMB: c.memMB, spin: c.slowdown, run: policy})
	read := func() map[string]float64 {
		raw, err := sg.api.GetRaw(ctxT(b), "/metrics")
		if err != nil {
			b.Fatal(err)
		}
		m := map[string]float64{}
		for _, n := range []string{
			`kvmscope_scheduled_scan_cpu_seconds_sum`,
			`kvmscope_scheduled_scan_cpu_seconds_count`,
			`kvmscope_scan_read_bytes_sum{kind="processes"}`,
			`kvmscope_scan_read_bytes_sum{kind="modules"}`,
			`kvmscope_scan_read_bytes_sum{kind="crossview"}`,
			`kvmscope_scan_read_bytes_sum{kind="integrity"}`,
			`kvmscope_scans_total{kind="processes",result="partial"}`,
		} {
			m[n], _ = metric(string(raw), n)
		}
		return m
	}
	waitFor(b, 2*time.Minute, "two scheduled scans", func() bool { return read()[`kvmscope_scheduled_scan_cpu_seconds_count`] >= 2 })
	m0, t0 := read(), time.Now()
	n0 := strings.Count(sg.g.Serial(), "KVMSCOPE-TICK")
	time.Sleep(window)
	m1, wall := read(), time.Since(t0)
	on := float64(strings.Count(sg.g.Serial(), "KVMSCOPE-TICK")-n0) / wall.Seconds()
	d := func(n string) float64 { return m1[n] - m0[n] }
	scans := d(`kvmscope_scheduled_scan_cpu_seconds_count`)
	if scans < 1 {
		b.Fatalf("no scheduled scan in %v", wall)
	}
	cpu := d(`kvmscope_scheduled_scan_cpu_seconds_sum`) / scans
	b.ReportMetric(cpu*1000, "scan-cpu-ms")
	var readBytes float64
	for _, k := range []string{"processes", "modules", "crossview", "integrity"} {
		readBytes += d(`kvmscope_scan_read_bytes_sum{kind="` + k + `"}`)
	}
	b.ReportMetric(readBytes/scans/1024, "scan-read-kib")
	b.ReportMetric(cpu/0.5, "budget-used-ratio")
	b.ReportMetric(d(`kvmscope_scheduled_scan_cpu_seconds_sum`)/wall.Seconds(), "duty-ratio")
	b.ReportMetric(d(`kvmscope_scans_total{kind="processes",result="partial"}`), "partial-scans")
	b.ReportMetric(scans, "scans")
	if c.slowdown {
		sg.g.Close()
		r, sg2 := tickRate(nil)
		sg2.g.Close()
		off = append(off, r)
		if on <= 0 {
			b.Fatal("the busy loop printed no tick while scanned")
		}
		b.ReportMetric((off[0]+off[1])/2/on, "guest-slowdown-ratio")
		b.ReportMetric(on, "ticks-per-s")
		// The noise floor: the two unscanned guests' rates.
		b.ReportMetric(max(off[0], off[1])/min(off[0], off[1]), "unscanned-spread-ratio")
	}
}
