package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testenv"
)

// The tests here run the real kvmscope binary against real QEMU.

var kvmscopeBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "kvmscope-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	kvmscopeBin = filepath.Join(dir, "kvmscope")
	if lab := os.Getenv("KVMSCOPE_BIN_DIR"); lab != "" {
		// Inside the nested-KVM lab, which has no Go: built beforehand.
		kvmscopeBin = filepath.Join(lab, "kvmscope")
	} else if out, err := exec.Command("go", "build", "-o", kvmscopeBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build kvmscope: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// needQEMU skips when qemu-system-x86_64 is not installed.
func needQEMU(t *testing.T) string {
	t.Helper()
	testenv.Require(t, testenv.QEMU)
	p, _ := exec.LookPath("qemu-system-x86_64")
	return p
}

// running is a `kvmscope run` started by a test.
type running struct {
	t      *testing.T
	cmd    *exec.Cmd
	sock   string
	stderr *bytes.Buffer
	done   chan struct{}
	err    error
}

// startRun starts `kvmscope run --api SOCK -- qemu ARGS...`.
func startRun(t *testing.T, runFlags []string, qemuArgs ...string) *running {
	t.Helper()
	return startRunAt(t, filepath.Join(t.TempDir(), "api.sock"), runFlags, qemuArgs...)
}

// startRunAt is startRun serving the socket sock.
func startRunAt(t *testing.T, sock string, runFlags []string, qemuArgs ...string) *running {
	t.Helper()
	qemu := needQEMU(t)
	args := append([]string{"--log-level", "debug", "run", "--api", sock}, runFlags...)
	args = append(args, "--", qemu)
	args = append(args, qemuArgs...)
	r := &running{t: t, sock: sock, stderr: &bytes.Buffer{}, done: make(chan struct{})}
	r.cmd = exec.Command(kvmscopeBin, args...)
	r.cmd.Stderr = r.stderr
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.err = r.cmd.Wait(); close(r.done) }()
	t.Cleanup(func() {
		select {
		case <-r.done:
		default:
			r.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-r.done:
			case <-time.After(10 * time.Second):
				r.cmd.Process.Kill()
				<-r.done
			}
		}
		if t.Failed() {
			t.Logf("kvmscope stderr:\n%s", tail(r.stderr.String(), 4000))
		}
	})
	return r
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// client waits for the API socket and returns a client.
func (r *running) client() *api.Client {
	r.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(r.sock); err == nil {
			return api.NewClient(r.sock)
		}
		select {
		case <-r.done:
			r.t.Fatalf("kvmscope exited early: %v\n%s", r.err, r.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	r.t.Fatalf("API socket %s did not appear", r.sock)
	return nil
}

// wait waits for kvmscope to exit and returns its exit code.
func (r *running) wait(timeout time.Duration) int {
	r.t.Helper()
	select {
	case <-r.done:
	case <-time.After(timeout):
		r.t.Fatalf("kvmscope did not exit within %v", timeout)
	}
	if r.err == nil {
		return 0
	}
	if ee, ok := r.err.(*exec.ExitError); ok {
		// As a shell reports it: 128+N when killed by signal N.
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	r.t.Fatalf("wait: %v", r.err)
	return -1
}

// kvmscope runs the CLI and returns stdout, stderr and exit code.
func kvmscope(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(kvmscopeBin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestVersionPassesThrough(t *testing.T) {
	qemu := needQEMU(t)
	want, err := exec.Command(qemu, "-version").Output()
	if err != nil {
		t.Fatal(err)
	}
	out, errOut, code := kvmscope(t, "run", "--", qemu, "-version")
	if code != 0 || out != string(want) || errOut != "" {
		t.Fatalf("kvmscope run -- qemu -version: code %d\nstdout %q\nwant   %q\nstderr %q", code, out, want, errOut)
	}
}

// TestUserErrors checks that bad input gives one clear line and a non-zero
// exit, never a stack trace.
func TestUserErrors(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"missing qemu", []string{"run", "--", "/nonexistent/qemu-system-x86_64"}, "cannot run QEMU"},
		{"no qemu", []string{"run"}, "run needs a QEMU command"},
		{"bad flag", []string{"vcpus", "--bogus"}, "flag provided but not defined"},
		{"unreachable socket", []string{"vcpus", "--api", "/nonexistent/x.sock"}, "cannot reach kvmscope API"},
		{"bad gpa", []string{"mem", "--api", "/tmp/x.sock", "--gpa", "zz"}, "bad --gpa"},
		{"no api", []string{"vm"}, "--api SOCKET or --vm NAME"},
		{"regs without vcpu", []string{"regs", "set", "--api", "/tmp/x.sock", "rax=1"}, "--vcpu N"},
		{"regs bad value", []string{"regs", "set", "--vcpu", "0", "rax=zz"}, "not a 64-bit number"},
		{"regs no value", []string{"regs", "set", "--vcpu", "0", "rax"}, "want NAME=VALUE"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := kvmscope(t, tc.args...)
			lines := strings.Split(strings.TrimSpace(errOut), "\n")
			if code == 0 || len(lines) != 1 || !strings.Contains(errOut, tc.want) || strings.Contains(errOut, "goroutine") {
				t.Fatalf("kvmscope %v: code %d, stderr %q; want one line containing %q", tc.args, code, errOut, tc.want)
			}
		})
	}
}

func TestPrintable(t *testing.T) {
	for in, want := range map[string]string{
		"sh -c \"a\nb\"":         `sh -c "a?b"`,
		"tab\there":              "tab?here",
		"ok":                     "ok",
		"\x1b[31mred":            "?[31mred",
		strings.Repeat("x", 210): strings.Repeat("x", 200) + "…",
	} {
		if got := printable(in, 200); got != want {
			t.Errorf("printable(%q) = %q, want %q", in, got, want)
		}
	}
}
