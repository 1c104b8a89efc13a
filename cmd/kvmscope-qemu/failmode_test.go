package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
)

// deniedWrapper is kvmscope-qemu ARGS started by a launcher that makes
// ptrace fail with EPERM.
func deniedWrapper(config string, args ...string) *exec.Cmd {
	self, _ := os.Executable()
	cmd := exec.Command(self, append([]string{wrapperBin}, args...)...)
	cmd.Env = append(os.Environ(), "KVMSCOPE_CONFIG="+config, denyPtraceEnv+"=1")
	return cmd
}

// TestFailClosed: when ptrace is refused, the default fail_mode (closed)
// does not start QEMU and says why.
func TestFailClosed(t *testing.T) {
	qemu := needQEMU(t)
	config, sockDir := writeConfig(t, "qemu: "+qemu+"\n")
	r := runCmd(t, deniedWrapper(config, tcgArgs("closed")...), 30*time.Second)
	if r.code == 0 || !strings.Contains(r.stderr, "cannot trace QEMU") || !strings.Contains(r.stderr, "fail_mode closed") {
		t.Fatalf("fail-closed: code %d, stderr %q; want an error naming fail_mode closed", r.code, r.stderr)
	}
	if out, _ := exec.Command("pgrep", "-f", "guest=closed,").Output(); len(out) > 0 {
		t.Fatalf("QEMU runs after fail-closed: pids %s", out)
	}
	if _, err := os.Stat(filepath.Join(sockDir, "closed.sock")); err == nil {
		t.Errorf("socket left after fail-closed")
	}
}

// TestFailOpen: with fail_mode open, a refused tracer means the real QEMU
// runs untraced in the wrapper's place (same pid, so libvirt's pid and
// monitor stay right), with a warning.
func TestFailOpen(t *testing.T) {
	qemu := needQEMU(t)
	config, _ := writeConfig(t, "qemu: "+qemu+"\nfail_mode: open\n")
	cmd := deniedWrapper(config, tcgArgs("open")...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() { cmd.Process.Kill(); <-done }()
	pid := cmd.Process.Pid
	deadline := time.Now().Add(20 * time.Second)
	for {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); exe == qemu {
			break
		}
		select {
		case err := <-done:
			done <- err
			t.Fatalf("exited early: %v\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never became QEMU\n%s", pid, stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st := procStatus(pid); !strings.Contains(st, "TracerPid:\t0\n") {
		t.Errorf("fail-open QEMU is traced")
	}
	if s := stderr.String(); !strings.Contains(s, `"level":"warn"`) || !strings.Contains(s, `"fail_mode":"open"`) || !strings.Contains(s, `"vm":"open"`) {
		t.Errorf("want a JSON warning naming fail_mode open and the VM on stderr, got %q", s)
	}
}

// getMetrics fetches /metrics from the API socket.
func getMetrics(t *testing.T, sock string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b, err := api.NewClient(sock).GetRaw(ctx, "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	return string(b)
}
