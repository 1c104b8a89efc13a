package main

import (
	"context"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// metric returns the value of the /metrics line that starts with name
// (labels included), and whether it is there.
func metric(m, name string) (float64, bool) {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`)
	g := re.FindStringSubmatch(m)
	if g == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(g[1], 64)
	return v, err == nil
}

// TestScanBudget: scheduled scans whose byte budget is far too small for
// a Debian guest stop and are reported as partial in /metrics (result
// "partial", nothing left of the budget), never as an all clear: no
// process event comes of them. On-demand `ps` is not budgeted and still
// lists every process.
func TestScanBudget(t *testing.T) {
	p := testlinux.Require(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel: p.DebianKernel,
		Accel:  "tcg",
		Wrapper: []string{kvmscopeBin, "--log-level", "warn", "run", "--api", sock,
			"--scan-interval", "1s", "--scan-max-bytes", "4096", "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()
	c := api.NewClient(sock)
	var m string
	partial := func() (float64, float64) {
		b, err := c.GetRaw(ctxT(t), "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		m = string(b)
		n, _ := metric(m, `kvmscope_scans_total{kind="processes",result="partial"}`)
		ok, _ := metric(m, `kvmscope_scans_total{kind="processes",result="ok"}`)
		return n, ok
	}
	// A scan early in the boot (a few kernel threads) may fit the budget;
	// once the guest runs, none does.
	n0, ok0 := partial()
	waitFor(t, 60*time.Second, "two more partial scheduled scans", func() bool {
		n, _ := partial()
		return n >= n0+2
	})
	if _, ok := partial(); ok != ok0 {
		t.Errorf("%v scheduled scans of the booted guest within 4096 bytes were complete", ok-ok0)
	}
	if left, ok := metric(m, `kvmscope_scheduled_scan_budget_left{resource="bytes"}`); !ok || left != 0 {
		t.Errorf("budget left %v (%v), want 0:\n%s", left, ok, m)
	}
	if used, ok := metric(m, `kvmscope_scheduled_scan_last{resource="bytes"}`); !ok || used < 4096 || used > 4096+64<<10 {
		t.Errorf("last scan read %v bytes (%v), want the budget and at most one batch more", used, ok)
	}
	if _, ok := metric(m, `kvmscope_scheduled_scan_cpu_seconds_count`); !ok {
		t.Errorf("no per-scan CPU histogram in /metrics")
	}
	for _, e := range events(t, sock) {
		if k, _ := e["kind"].(string); strings.HasPrefix(k, "process_") || strings.HasPrefix(k, "module_") {
			t.Errorf("a partial scan made an event: %v", e)
		}
	}
	ps := psJSON(t, "--api", sock)
	if len(ps) < len(g.PS())-5 {
		t.Errorf("on-demand ps: %d processes, the guest lists %d", len(ps), len(g.PS()))
	}
}
