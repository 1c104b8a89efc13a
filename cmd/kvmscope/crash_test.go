package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/guestmem/qmp"
	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// killAnalysis kill -9s the analysis process of the VM behind c and
// waits until a new one serves the API; it returns the new one's pid.
func killAnalysis(t *testing.T, c *api.Client) int {
	t.Helper()
	vm := getVM(t, c)
	if vm.AnalysisPid == 0 || vm.AnalysisPid == vm.TracerPid || vm.AnalysisPid == vm.Pid {
		t.Fatalf("analysis pid %d (tracer %d, QEMU %d)", vm.AnalysisPid, vm.TracerPid, vm.Pid)
	}
	if err := syscall.Kill(vm.AnalysisPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var now api.VM
	waitFor(t, 30*time.Second, "a new analysis process to serve the API", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		now = api.VM{}
		return c.Get(ctx, "/v1/vm", &now) == nil && now.AnalysisPid != 0 && now.AnalysisPid != vm.AnalysisPid
	})
	if now.TracerPid != vm.TracerPid || now.Pid != vm.Pid {
		t.Fatalf("after the analysis process died: tracer %d QEMU %d, were %d %d", now.TracerPid, now.Pid, vm.TracerPid, vm.Pid)
	}
	if alive(vm.AnalysisPid) {
		t.Fatalf("the killed analysis process %d is still there", vm.AnalysisPid)
	}
	return now.AnalysisPid
}

// TestCrashIsolationKVM (issue 12): kill -9 of the analysis process, the
// part that parses guest memory, while the tiny guest runs under KVM: QEMU
// and the guest go on (the counter advances), a memslot change QEMU makes
// afterwards succeeds and is seen, the API comes back, and the tracer's
// events keep their sequence. kill -9 of the tracer itself fails closed
// (TestKill9FailsClosed).
func TestCrashIsolationKVM(t *testing.T) {
	args := tinyGuest(t, 2, "")
	dir := t.TempDir()
	qmpPath := filepath.Join(dir, "qmp.sock")
	pol := writeFile(t, "p.yaml", docPolicy) // logs every memslot change
	r := startRun(t, []string{"--policy", pol}, append(args, "-qmp", "unix:"+qmpPath+",server=on,wait=off")...)
	c := r.client()
	waitReady(t, c)
	pid := qemuPid(t, r)
	before := readU64(t, c, testguest.CounterGPA)
	seqBefore := lastSeq(t, r.sock)

	for round := 0; round < 2; round++ {
		killAnalysis(t, c)
		if !alive(pid) {
			t.Fatalf("round %d: QEMU died with the analysis process", round)
		}
		waitFor(t, 10*time.Second, "the counter to go on", func() bool { return readU64(t, c, testguest.CounterGPA) > before })
		before = readU64(t, c, testguest.CounterGPA)
	}
	var cpus []api.VCPU
	if err := c.Get(ctxT(t), "/v1/vcpus", &cpus); err != nil || len(cpus) != 2 {
		t.Fatalf("/v1/vcpus after restarts: %+v (%v)", cpus, err)
	}

	// A memslot change after the kill: QEMU turns dirty logging on for
	// every slot and off again (what migration does first). The trapped
	// KVM_SET_USER_MEMORY_REGION calls go through the tracer, which
	// never went away; the new analysis process sees the table change.
	ctx, q := dialQMP(t, qmpPath)
	if _, err := q.Execute(ctx, "calc-dirty-rate", map[string]any{"calc-time": 1, "mode": "dirty-bitmap"}); err != nil {
		t.Fatalf("calc-dirty-rate: %v", err)
	}
	sawDirty := false
	for {
		if vm := getVM(t, c); len(vm.Memslots) > 0 {
			for _, m := range vm.Memslots {
				sawDirty = sawDirty || m.DirtyLog
			}
		}
		reply, err := q.Execute(ctx, "query-dirty-rate", nil)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(reply), `"measured"`) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !sawDirty {
		t.Error("the API never showed a memslot with dirty logging during calc-dirty-rate")
	}
	if !alive(pid) {
		t.Fatal("QEMU died at the memslot change")
	}
	waitFor(t, 10*time.Second, "the counter to go on after the memslot change", func() bool { return readU64(t, c, testguest.CounterGPA) > before })

	// The tracer's events of the memslot change (the policy logs them)
	// reached the log through the new analysis process, numbered on.
	seen := map[float64]bool{}
	logged, restarts := false, 0
	for _, e := range events(t, r.sock) {
		s, _ := e["seq"].(float64)
		if seen[s] {
			t.Errorf("event seq %v twice", s)
		}
		seen[s] = true
		logged = logged || s > float64(seqBefore) && e["ioctl"] == "KVM_SET_USER_MEMORY_REGION"
		if e["kind"] == "analysis_restart" && e["reason"] == "died" {
			restarts++
		}
	}
	if restarts != 2 {
		t.Errorf("%d analysis_restart events with reason died, want one per kill (2)", restarts)
	}
	if !logged {
		t.Errorf("no KVM_SET_USER_MEMORY_REGION event after the restarts (events up to seq %d, %d before)", lastSeq(t, r.sock), seqBefore)
	}
	if !strings.Contains(r.stderr.String(), "the analysis process died; QEMU runs on") {
		t.Error("the tracer did not log the analysis process's death")
	}

	r.cmd.Process.Signal(syscall.SIGTERM)
	if code := r.wait(20 * time.Second); code != 0 {
		t.Errorf("QEMU's exit code %d after SIGTERM, want 0", code)
	}
}

// TestCrashIsolationLinux (issue 12): kill -9 of the analysis process while
// Debian boots under TCG, and again once it runs: the guest boots and runs
// on, and the new analysis process's ps is the guest's own table.
func TestCrashIsolationLinux(t *testing.T) {
	p := testlinux.Require(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	c := api.NewClient(sock)
	killed := make(chan error, 1)
	go func() {
		// As soon as the API answers: the guest is booting.
		deadline := time.Now().Add(2 * time.Minute)
		for time.Now().Before(deadline) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			var vm api.VM
			err := c.Get(ctx, "/v1/vm", &vm)
			cancel()
			if err == nil && vm.AnalysisPid != 0 {
				killed <- syscall.Kill(vm.AnalysisPid, syscall.SIGKILL)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		killed <- fmt.Errorf("the API never answered")
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   "tcg",
		Wrapper: []string{kvmscopeBin, "--log-level", "info", "run", "--api", sock, "--scan-interval", "1s", "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()
	if err := <-killed; err != nil {
		t.Fatalf("kill the analysis process during boot: %v", err)
	}
	checkPS(t, "ps after a kill during boot", psJSON(t, "--api", sock), g.PS())
	killAnalysis(t, c)
	checkPS(t, "ps after a kill while running", psJSON(t, "--api", sock), g.PS())
	// The guest still runs: its console answers.
	out, err := g.HMP("info status")
	if err != nil || !strings.Contains(out, "running") {
		t.Fatalf("QEMU after the kills: %q (%v)", out, err)
	}
	var rep json.RawMessage
	if err := c.Get(ctxT(t), "/v1/report", &rep); err != nil {
		t.Fatalf("report after the kills: %v", err)
	}
}

// dialQMP connects to QEMU's QMP socket path for the rest of the test;
// ctx bounds each command to a minute of the test.
func dialQMP(t *testing.T, path string) (context.Context, *qmp.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	q, err := qmp.Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return ctx, q
}

// TestAnalysisWatchdog (issue 12): an analysis process that stops
// answering (SIGSTOP here; a deadlock or a process stuck in the kernel
// looks the same from outside) while it holds QEMU paused is killed by
// the tracer's watchdog (run --watchdog) and replaced: QEMU lives, the
// guest runs again, the API comes back, and the restart is an event. One
// that answers is left alone, even while it keeps the VM paused.
func TestAnalysisWatchdog(t *testing.T) {
	const dog = 3 * time.Second
	r := startRun(t, []string{"--watchdog", dog.String()}, tinyGuest(t, 1, "")...)
	c := r.client()
	waitReady(t, c)
	pid := qemuPid(t, r)
	first := getVM(t, c).AnalysisPid

	// A dump whose client stops reading keeps the VM paused (the dump is
	// made with the guest stopped) while the analysis process, blocked
	// on the socket, still answers its health checks.
	stallDump(t, r)
	paused := func() bool { return tinyPaused(t, c) }
	waitFor(t, 10*time.Second, "the stalled dump to hold the guest paused", paused)
	time.Sleep(2 * dog)
	if now := getVM(t, c).AnalysisPid; now != first {
		t.Fatalf("the watchdog replaced an analysis process that answered: %d, now %d", first, now)
	}
	if !paused() {
		t.Fatal("the guest ran while the dump's pause was held")
	}

	// Now it stops answering with the pause held.
	stopped := time.Now()
	if err := syscall.Kill(first, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(first, syscall.SIGKILL) }) // when the watchdog failed
	var now api.VM
	waitFor(t, 10*dog, "the watchdog to replace the stopped analysis process", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		now = api.VM{}
		return c.Get(ctx, "/v1/vm", &now) == nil && now.AnalysisPid != 0 && now.AnalysisPid != first
	})
	// Its last answer may have come up to one probe (a third of the
	// bound) before the stop.
	if took := time.Since(stopped); took < dog*2/3 {
		t.Errorf("replaced %v after it stopped answering, before the watchdog's %v", took, dog)
	}
	if alive(first) {
		t.Errorf("the stopped analysis process %d is still there", first)
	}
	if !alive(pid) || now.Pid != pid {
		t.Fatalf("QEMU %d after the watchdog: alive %v, the API says %d", pid, alive(pid), now.Pid)
	}
	// Its pause went with it: the guest runs.
	before := readU64(t, c, testguest.CounterGPA)
	waitFor(t, 10*time.Second, "the guest to run again", func() bool { return readU64(t, c, testguest.CounterGPA) > before })

	// The new analysis process takes the tracer's queued event into the
	// log soon after it serves.
	var ev map[string]any
	waitFor(t, 10*time.Second, "the analysis_restart event in the log", func() bool {
		for _, e := range events(t, r.sock) {
			if e["kind"] == "analysis_restart" {
				ev = e
			}
		}
		return ev != nil
	})
	if ev == nil || ev["reason"] != "hung" || ev["pid"] != float64(first) {
		t.Fatalf("analysis_restart event %v; want reason hung, pid %d", ev, first)
	}
	if s, _ := ev["silent_ns"].(float64); time.Duration(s) < dog {
		t.Errorf("analysis_restart event silent_ns %v, want at least %v", ev["silent_ns"], dog)
	}
	if !strings.Contains(r.stderr.String(), "watchdog: the analysis process has not answered; killing it") {
		t.Error("the tracer did not log the watchdog's kill")
	}
	r.cmd.Process.Signal(syscall.SIGTERM)
	if code := r.wait(20 * time.Second); code != 0 {
		t.Errorf("QEMU's exit code %d after SIGTERM, want 0", code)
	}
}
