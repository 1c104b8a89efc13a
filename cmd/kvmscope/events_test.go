package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// TestEvents: the policy's events come back through GET /v1/events and
// `kvmscope events`, in sequence, --since skips what was read, --follow
// prints a new event as it happens (a kick makes QEMU enter KVM_RUN again,
// which a log rule records), and /metrics counts them.
func TestEvents(t *testing.T) {
	pol := writeFile(t, "p.yaml", "rules:\n  - name: every KVM_RUN\n    ioctl: KVM_RUN\n    action: log\n")
	r := startRun(t, []string{"--policy", pol}, tinyGuest(t, 1, "")...)
	c := r.client()
	waitReady(t, c)
	out, errOut, code := kvmscope(t, "events", "--api", r.sock, "--json")
	if code != 0 {
		t.Fatalf("events: code %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var last uint64
	for i, l := range lines {
		var e struct {
			Seq   uint64 `json:"seq"`
			Kind  string `json:"kind"`
			Ioctl string `json:"ioctl"`
		}
		if err := json.Unmarshal([]byte(l), &e); err != nil || e.Seq != uint64(i+1) || e.Kind != "ioctl" || e.Ioctl != "KVM_RUN" {
			t.Fatalf("event %d: %q (%v)", i, l, err)
		}
		last = e.Seq
	}
	out, _, _ = kvmscope(t, "events", "--api", r.sock, "--since", fmt.Sprint(last))
	if strings.Contains(out, fmt.Sprintf("%d\t", last)) {
		t.Errorf("--since %d printed event %d again:\n%s", last, last, out)
	}

	// --follow: a new event arrives while it waits.
	f2 := exec.Command(kvmscopeBin, "events", "--api", r.sock, "--follow", "--json", "--since", fmt.Sprint(lastSeq(t, r.sock)))
	pipe2, _ := f2.StdoutPipe()
	if err := f2.Start(); err != nil {
		t.Fatal(err)
	}
	defer f2.Process.Kill()
	time.Sleep(300 * time.Millisecond)
	if _, _, code := kvmscope(t, "vcpus", "--api", r.sock); code != 0 {
		t.Fatal("vcpus failed")
	}
	got := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pipe2)
		if sc.Scan() {
			got <- sc.Text()
		}
	}()
	select {
	case l := <-got:
		if !strings.Contains(l, `"ioctl":"KVM_RUN"`) {
			t.Errorf("followed event %q", l)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("--follow printed nothing after a kick")
	}
	b, err := c.GetRaw(ctxT(t), "/metrics")
	m := string(b)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(m, `kvmscope_events_total{kind="ioctl"}`) {
		t.Errorf("/metrics has no kvmscope_events_total:\n%s", m)
	}
}

func lastSeq(t *testing.T, sock string) uint64 {
	t.Helper()
	ev := events(t, sock)
	if len(ev) == 0 {
		t.Fatal("no events")
	}
	return uint64(ev[len(ev)-1]["seq"].(float64))
}

// TestProcessEvents: with --scan-interval, a process the guest starts
// late (the test initramfs's crypto-miner, kvmscope.late=3) becomes an
// event within a scan interval or two: process_exec, as the shell's
// subshell, seen at its fork, executes it. (Scans start with
// QEMU, so what the guest starts while it boots is reported too.)
func TestProcessEvents(t *testing.T) {
	p := testlinux.Require(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   "tcg",
		Append:  "kvmscope.late=3",
		Wrapper: []string{kvmscopeBin, "--log-level", "warn", "run", "--scan-interval", "1s", "--api", sock, "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var starts []map[string]any
		for _, e := range events(t, sock) {
			if e["kind"] == "process_start" || e["kind"] == "process_exec" {
				starts = append(starts, e)
			}
		}
		var miner map[string]any
		for _, e := range starts {
			if e["comm"] == "crypto-miner" {
				miner = e
			}
		}
		if miner != nil {
			if miner["ppid"] == nil || miner["task"] == nil || miner["start_time_ns"] == nil {
				t.Errorf("process_start event lacks evidence: %v", miner)
			}
			break
		}
		if time.Now().After(deadline) {
			var comms []any
			for _, e := range starts {
				comms = append(comms, e["comm"])
			}
			out, _, _ := kvmscope(t, "ps", "--api", sock)
			t.Fatalf("no process_start event for crypto-miner within 60 s; starts: %v\nps:\n%s", comms, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
