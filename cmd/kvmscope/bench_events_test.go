package main

import (
	"bufio"
	"encoding/json"
	"os/exec"
	"slices"
	"testing"
	"time"
)

// BenchmarkEventLatency is the time from a scheduled scan's end to a
// following client: `kvmscope run --scan-interval 500ms` on Debian under
// TCG whose /init starts a `sleep 1` every second (kvmscope.churn=1), so
// that scans keep finding processes started and gone, and `kvmscope
// events --follow --json` reading the socket. Each process event's time
// is taken when the scan appends it, at the scan's end; the latency is
// when the CLI printed its line, minus that (one host clock). Metrics:
// event-latency-ms (median), event-latency-p90-ms, events.
func BenchmarkEventLatency(b *testing.B) {
	sg := bootScanGuestWith(b, scanBoot{accel: "tcg", memMB: 512, churn: true, run: []string{"--scan-interval", "500ms"}})
	cmd := exec.Command(kvmscopeBin, "events", "--api", sg.sock, "--follow", "--json", "--since", "0")
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	// Past the backlog of the boot: only events appended while following.
	start := time.Now().Add(time.Second)
	var lat []float64
	lines := make(chan []byte)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- append([]byte(nil), sc.Bytes()...)
		}
		close(lines)
	}()
	deadline := time.After(20 * time.Second)
collect:
	for len(lat) < 30 {
		select {
		case l, ok := <-lines:
			if !ok {
				b.Fatal("events --follow ended")
			}
			got := time.Now()
			var e struct {
				Kind string    `json:"kind"`
				Time time.Time `json:"time"`
			}
			if json.Unmarshal(l, &e) != nil || (e.Kind != "process_start" && e.Kind != "process_exit") || e.Time.Before(start) {
				continue
			}
			lat = append(lat, float64(got.Sub(e.Time).Microseconds())/1000)
		case <-deadline:
			if len(lat) < 5 {
				b.Fatalf("%d process events in 20 s", len(lat))
			}
			break collect
		}
	}
	slices.Sort(lat)
	b.ReportMetric(lat[len(lat)/2], "event-latency-ms")
	b.ReportMetric(lat[len(lat)*9/10], "event-latency-p90-ms")
	b.ReportMetric(float64(len(lat)), "events")
}
