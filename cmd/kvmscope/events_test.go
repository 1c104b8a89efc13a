package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
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
