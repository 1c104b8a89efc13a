package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/session"
)

var (
	victimLine = regexp.MustCompile(`KVMSCOPE-VICTIM (\d+) (\d+)`)
	reapedLine = regexp.MustCompile(`KVMSCOPE-REAPED (\d+) (\d+) (\w+)`)
	aliveLine  = regexp.MustCompile(`KVMSCOPE-ALIVE (\d+)`)
)

// TestKill: `kvmscope kill` (Debian 6.1 under TCG, run --allow-write, the
// initramfs's kvmscope.victim=1) kills the guest's "sleep 1000" through a
// kill(2) of a guest root process: its parent reaps it with status 137
// (SIGKILL) and /proc no longer lists it, kvmscope ps no longer lists it,
// the guest goes on (its ALIVE counter advances), and a guest_action
// event says who made the call and that it returned 0. A second kill
// ("sleep 1001") works the same, through a gdbstub opened again. Pid 1, a kernel
// thread and a pid that does not exist are refused with one line, and so
// is a kill on a VM started without --allow-write.
func TestKill(t *testing.T) {
	p := testlinux.Require(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   "tcg",
		Append:  "kvmscope.victim=1",
		Wrapper: []string{kvmscopeBin, "--log-level", "warn", "run", "--allow-write", "--api", sock, "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()
	var victim, second int
	waitFor(t, 60*time.Second, "KVMSCOPE-VICTIM on the console", func() bool {
		m := victimLine.FindStringSubmatch(g.Serial())
		if m != nil {
			victim, _ = strconv.Atoi(m[1])
			second, _ = strconv.Atoi(m[2])
		}
		return m != nil
	})
	listed := func(pid int) bool {
		for _, pr := range psJSON(t, "--api", sock) {
			if pr.PID == pid && pr.Comm == "sleep" {
				return true
			}
		}
		return false
	}
	if !listed(victim) || !listed(second) {
		t.Fatalf("kvmscope ps does not list the victims, sleep pids %d and %d", victim, second)
	}

	// Refusals, each one line, before anything is done.
	kthread := 0
	for _, pr := range psJSON(t, "--api", sock) {
		if pr.KThread && pr.PID > 1 {
			kthread = pr.PID
			break
		}
	}
	for _, c := range []struct {
		pid  int
		want string
	}{{1, "pid 1 is init"}, {kthread, "kernel thread"}, {999999, "no process with pid 999999"}} {
		out, errOut, code := kvmscope(t, "kill", "--api", sock, "--pid", strconv.Itoa(c.pid))
		if code == 0 || !strings.Contains(errOut, c.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("kill --pid %d: code %d, stdout %q, stderr %q; want one line with %q", c.pid, code, out, errOut, c.want)
		}
	}

	alive := func() int {
		n := 0
		for _, m := range aliveLine.FindAllStringSubmatch(g.Serial(), -1) {
			n, _ = strconv.Atoi(m[1])
		}
		return n
	}
	before := alive()
	start := time.Now()
	out, errOut, code := kvmscope(t, "kill", "--api", sock, "--pid", strconv.Itoa(victim), "--json")
	if code != 0 {
		t.Fatalf("kill --pid %d: code %d: %s%s", victim, code, out, errOut)
	}
	var a session.GuestAction
	if err := json.Unmarshal([]byte(out), &a); err != nil {
		t.Fatalf("kill --json: %v: %s", err, out)
	}
	t.Logf("kill took %v: %+v", time.Since(start), a)
	if a.Action != "kill" || a.PID != victim || a.Comm != "sleep" || a.Return != 0 || a.ByPID <= 1 || a.ByPID == victim || a.Syscall != 62 || a.Signal != 9 {
		t.Errorf("kill reply %+v", a)
	}
	// The guest's own view: the parent reaped it, killed by SIGKILL.
	reaped := func(pid int) {
		t.Helper()
		var m []string
		waitFor(t, 30*time.Second, "KVMSCOPE-REAPED on the console", func() bool {
			for _, r := range reapedLine.FindAllStringSubmatch(g.Serial(), -1) {
				if r[1] == strconv.Itoa(pid) {
					m = r
				}
			}
			return m != nil
		})
		if m[2] != "137" || m[3] != "gone" {
			t.Errorf("the guest reports %q; want pid %d reaped with status 137 (SIGKILL), gone from /proc", m[0], pid)
		}
		t.Logf("guest: %s", m[0])
		if listed(pid) {
			t.Errorf("kvmscope ps still lists pid %d after the kill", pid)
		}
	}
	reaped(victim)
	if !listed(second) {
		t.Errorf("the kill of %d took %d too", victim, second)
	}
	// A second action opens the gdbstub again (the first closed it).
	out, errOut, code = kvmscope(t, "kill", "--api", sock, "--pid", strconv.Itoa(second))
	if code != 0 || !strings.Contains(out, "killed pid "+strconv.Itoa(second)+" (sleep)") {
		t.Fatalf("kill --pid %d: code %d: %s%s", second, code, out, errOut)
	}
	t.Logf("%s", strings.TrimSpace(out))
	reaped(second)
	// The guest goes on: its counter advances.
	deadline := time.Now().Add(30 * time.Second)
	for alive() <= before+2 {
		if time.Now().After(deadline) {
			t.Fatalf("the guest's ALIVE counter stays at %d (was %d at the kill); console:\n%s", alive(), before, tail(g.Serial(), 3000))
		}
		time.Sleep(100 * time.Millisecond)
	}

	var evs []map[string]any
	for _, e := range events(t, sock) {
		if e["kind"] == "guest_action" {
			evs = append(evs, e)
		}
	}
	if len(evs) != 2 || evs[0]["action"] != "kill" || evs[0]["pid"] != float64(victim) || evs[0]["return"] != float64(0) || evs[0]["by_pid"] != float64(a.ByPID) || evs[1]["pid"] != float64(second) {
		t.Errorf("guest_action events %v; want the kills of %d by %d and of %d, returning 0", evs, victim, a.ByPID, second)
	}

	// Without --allow-write: refused before anything is read or done.
	g.Close()
	ro := filepath.Join(t.TempDir(), "ro.sock")
	g2, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   "tcg",
		Append:  "kvmscope.victim=1",
		Wrapper: []string{kvmscopeBin, "--log-level", "warn", "run", "--api", ro, "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run without --allow-write: %v", err)
	}
	defer g2.Close()
	out, errOut, code = kvmscope(t, "kill", "--api", ro, "--pid", "2")
	if code == 0 || !strings.Contains(errOut, "--allow-write") || !strings.Contains(errOut, "403") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("kill without --allow-write: code %d, stdout %q, stderr %q; want one line, 403, naming --allow-write", code, out, errOut)
	}
	t.Logf("without --allow-write: %s", strings.TrimSpace(errOut))
}
