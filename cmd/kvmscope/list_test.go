package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
)

// startVM starts `kvmscope run --api DIR/NAME.sock -- qemu -name NAME
// ARGS...`: one VM of a host's socket directory.
func startVM(t *testing.T, dir, name string, qemuArgs ...string) *running {
	t.Helper()
	return startRunAt(t, filepath.Join(dir, name+".sock"), nil, append([]string{"-name", name}, qemuArgs...)...)
}

// staleSocket leaves a socket file nothing listens on, as a kvmscope
// killed with SIGKILL does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
}

func listJSON(t *testing.T, args ...string) map[string]listEntry {
	t.Helper()
	out, errOut, code := kvmscope(t, append([]string{"list", "--json"}, args...)...)
	if code != 0 {
		t.Fatalf("kvmscope list --json: code %d: %s", code, errOut)
	}
	var vms []listEntry
	if err := json.Unmarshal([]byte(out), &vms); err != nil {
		t.Fatalf("list --json: %v: %s", err, out)
	}
	m := map[string]listEntry{}
	for _, v := range vms {
		m[v.Name] = v
	}
	if len(m) != len(vms) {
		t.Fatalf("list --json names a VM twice: %s", out)
	}
	return m
}

// TestList: two tiny guests under kvmscope run, each with its socket in
// one directory, and a stale socket beside them: list --json has the two
// with QEMU's pid, the accelerator, vCPUs, RAM and QEMU's age, and no
// kernel (the tiny guest is not Linux) with the reason; the stale one is
// marked stale. The table lists the two and says on stderr why not the
// third, exit status 0.
func TestList(t *testing.T) {
	start := time.Now()
	dir := t.TempDir()
	alpha := startVM(t, dir, "alpha", tinyGuest(t, 1, "")...)
	beta := startVM(t, dir, "beta", tinyGuest(t, 2, "")...)
	waitReady(t, alpha.client())
	waitReady(t, beta.client())
	staleSocket(t, filepath.Join(dir, "gone.sock"))
	os.WriteFile(filepath.Join(dir, "notes.sock"), []byte("not a socket"), 0o600)

	vms := listJSON(t, "--dir", dir)
	if len(vms) != 3 {
		t.Fatalf("list --json: %+v; want alpha, beta and gone", vms)
	}
	for _, want := range []struct {
		r     *running
		name  string
		vcpus int
	}{{alpha, "alpha", 1}, {beta, "beta", 2}} {
		v := vms[want.name]
		// In-place launch: QEMU is the process kvmscope run started.
		if v.State != "up" || v.Error != "" || v.Pid != want.r.cmd.Process.Pid || v.Socket != want.r.sock {
			t.Errorf("%s: %+v; want up, pid %d, socket %s", want.name, v, want.r.cmd.Process.Pid, want.r.sock)
		}
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", v.Pid)); !strings.Contains(filepath.Base(exe), "qemu-system") {
			t.Errorf("%s: pid %d runs %q, not QEMU", want.name, v.Pid, exe)
		}
		if v.TracerPid == 0 || v.TracerPid == v.Pid {
			t.Errorf("%s: tracer pid %d", want.name, v.TracerPid)
		}
		if v.Accel != "kvm" || v.VCPUs != want.vcpus {
			t.Errorf("%s: accel %q, %d vCPUs; want kvm, %d", want.name, v.Accel, v.VCPUs, want.vcpus)
		}
		if v.MemoryBytes != testguest.MemoryMiB<<20 {
			t.Errorf("%s: memory %d bytes; want the guest's -m %dM", want.name, v.MemoryBytes, testguest.MemoryMiB)
		}
		if v.Kernel != "" || v.KernelError == "" {
			t.Errorf("%s: kernel %q (%q); want none, with the reason", want.name, v.Kernel, v.KernelError)
		}
		if age := time.Duration(v.UptimeSeconds * float64(time.Second)); age <= 0 || age > time.Since(start)+2*time.Second {
			t.Errorf("%s: uptime %v; the test started %v ago", want.name, age, time.Since(start))
		}
	}
	if g := vms["gone"]; g.State != "stale" || g.Error == "" || g.Pid != 0 {
		t.Errorf("gone: %+v; want stale with the reason", g)
	}
	t.Logf("list --json: alpha %+v", vms["alpha"])

	out, errOut, code := kvmscope(t, "list", "--dir", dir)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 3 || !strings.HasPrefix(lines[0], "NAME") ||
		!strings.HasPrefix(lines[1], "alpha ") || !strings.HasPrefix(lines[2], "beta ") {
		t.Errorf("kvmscope list: code %d\n%s", code, out)
	}
	if f := strings.Fields(lines[2]); len(f) != 8 || f[1] != fmt.Sprint(beta.cmd.Process.Pid) || f[3] != "kvm" || f[4] != "2" || f[5] != "64M" || f[6] != "-" {
		t.Errorf("beta's row %q; want pid %d, kvm, 2 vCPUs, 64M, no kernel", lines[2], beta.cmd.Process.Pid)
	}
	if !strings.Contains(errOut, "gone") || !strings.Contains(errOut, "stale") || strings.Contains(errOut, "notes") {
		t.Errorf("kvmscope list stderr %q; want a note on the stale socket only", errOut)
	}
	t.Logf("kvmscope list:\n%s%s", out, errOut)

	// A VM that goes away while others run: its tracer killed, its socket
	// left behind, is stale; the other is still listed.
	syscall.Kill(getVM(t, alpha.client()).TracerPid, syscall.SIGKILL)
	alpha.wait(20 * time.Second)
	vms = listJSON(t, "--dir", dir)
	if vms["alpha"].State != "stale" || vms["beta"].State != "up" {
		t.Errorf("after alpha's tracer was killed: alpha %+v, beta %+v", vms["alpha"], vms["beta"])
	}
}
