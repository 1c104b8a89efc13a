package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// startAttach runs `kvmscope attach` on QEMU pid through qmp, serving
// sock, and waits until it serves.
func startAttach(t *testing.T, pid int, qmp, sock string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(kvmscopeBin, "--log-level", "info", "attach", "--pid", strconv.Itoa(pid), "--qmp", qmp, "--api", sock)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(t, 30*time.Second, "attach to serve "+sock+" (stderr: "+stderr.String()+")", func() bool {
		var vm api.VM
		return api.NewClient(sock).Get(ctxT(t), "/v1/vm", &vm) == nil
	})
	return cmd
}

// TestAttach: a Debian guest QEMU started plainly (TCG, with a QMP
// socket) is attached to, read-only and without ptrace: its vCPUs, its
// memory map and its processes are right; detaching (SIGTERM) leaves QEMU
// running and untraced; a second attach works; an attach to a QMP socket
// of another process's memory is refused.
func TestAttach(t *testing.T) {
	g := plainDebian(t)
	dir := t.TempDir()
	for round := 1; round <= 2; round++ {
		sock := filepath.Join(dir, "vm.sock")
		cmd := startAttach(t, g.Pid(), g.SpareQMP(), sock)
		var vm api.VM
		if err := api.NewClient(sock).Get(ctxT(t), "/v1/vm", &vm); err != nil {
			t.Fatal(err)
		}
		if vm.Pid != g.Pid() || vm.Accel != "tcg" || len(vm.VCPUs) != 2 || len(vm.Regions) == 0 {
			t.Errorf("round %d: /v1/vm %+v", round, vm)
		}
		if tracer := tracerPid(t, g.Pid()); tracer != 0 {
			t.Errorf("round %d: QEMU is traced by %d while attached read-only", round, tracer)
		}
		checkPS(t, "ps through attach", psJSON(t, "--api", sock), g.PS())
		// Detach: a signal the first time, `kvmscope detach` the second.
		if round == 1 {
			if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
		} else if out, errOut, code := kvmscope(t, "detach", "--api", sock); code != 0 {
			t.Errorf("detach: code %d: %s%s", code, out, errOut)
		}
		if err := cmd.Wait(); err != nil {
			t.Errorf("round %d: attach after the detach: %v", round, err)
		}
		raw, err := g.QMP("query-status", nil)
		var st struct{ Running bool }
		if err != nil || json.Unmarshal(raw, &st) != nil || !st.Running {
			t.Fatalf("round %d: QEMU after detach: %s, %v", round, raw, err)
		}
		if _, err := os.Stat(sock); err == nil {
			t.Errorf("round %d: the socket is left behind after detach", round)
		}
	}
	// Our own pid with that QEMU's QMP socket: the map is not ours.
	out, errOut, code := kvmscope(t, "attach", "--pid", strconv.Itoa(os.Getpid()), "--qmp", g.SpareQMP(), "--api", filepath.Join(dir, "x.sock"))
	if code != 1 || !strings.Contains(errOut, "no mapping of process") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("attach with a foreign map: code %d: %s%s", code, out, errOut)
	}
}

// TestAttachKVM: the tiny guest under KVM, started plainly with a QMP
// socket, attached to: two vCPUs, its RAM, its spinning counter read
// through the API; after the detach its counter keeps advancing, and
// QEMU's exit status is its own.
func TestAttachKVM(t *testing.T) {
	args := tinyGuest(t, 2, "")
	dir := t.TempDir()
	qmp := filepath.Join(dir, "qmp.sock")
	qemu := exec.Command(needQEMU(t), append(args, "-qmp", "unix:"+qmp+",server=on,wait=off")...)
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { qemu.Process.Kill(); qemu.Wait() }()
	waitFor(t, 20*time.Second, "QEMU's QMP socket", func() bool { _, err := os.Stat(qmp); return err == nil })
	sock := filepath.Join(dir, "vm.sock")
	cmd := startAttach(t, qemu.Process.Pid, qmp, sock)
	c := api.NewClient(sock)
	var vm api.VM
	if err := c.Get(ctxT(t), "/v1/vm", &vm); err != nil || vm.Accel != "kvm" || len(vm.VCPUs) != 2 || vm.Pid != qemu.Process.Pid {
		t.Fatalf("/v1/vm %+v (%v)", vm, err)
	}
	waitFor(t, 20*time.Second, "the counter to advance", func() bool { return readU64(t, c, testguest.CounterGPA) > 0 })
	var cpus []api.VCPU
	if err := c.Get(ctxT(t), "/v1/vcpus", &cpus); err != nil || len(cpus) != 2 {
		t.Fatalf("/v1/vcpus %+v (%v)", cpus, err)
	}
	before := readU64(t, c, testguest.CounterGPA)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("attach after SIGTERM: %v", err)
	}
	// Read the counter again from a second attach: it went on.
	cmd = startAttach(t, qemu.Process.Pid, qmp, sock)
	waitFor(t, 10*time.Second, "the counter to go on after a detach", func() bool { return readU64(t, c, testguest.CounterGPA) > before })
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()
	if tracerPid(t, qemu.Process.Pid) != 0 {
		t.Error("QEMU is traced after detach")
	}
	// A VM launched under kvmscope run cannot be detached.
	r := startRun(t, nil, tinyGuest(t, 1, "")...)
	waitReady(t, r.client())
	if _, errOut, code := kvmscope(t, "detach", "--api", r.sock); code != 1 || !strings.Contains(errOut, "cannot be detached") {
		t.Errorf("detach of a run VM: code %d: %s", code, errOut)
	}

	qemu.Process.Signal(syscall.SIGTERM)
	err := qemu.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	if ws, ok := qemu.ProcessState.Sys().(syscall.WaitStatus); !ok || !(ws.Signaled() && ws.Signal() == syscall.SIGTERM) && ws.ExitStatus() != 0 {
		t.Errorf("QEMU's exit: %v", qemu.ProcessState)
	}
}

// TestAttachNoMonitor: attach --pid alone (no --qmp, no --vm) to Debian
// under TCG started plainly. Guest RAM is inferred from QEMU's -m,
// -machine and its one mapping of that size, split around the PCI hole
// as the machine type does, and checked against the guest kernel's own
// firmware memory map: ps equals the guest's table for a 512 MiB guest
// (one range), a 4 GiB i440fx guest (3 GiB below 4 GiB, 1 GiB above) and
// a 3 GiB q35 guest (2 GiB below, 1 GiB above), where the kernel's slab
// memory lies mostly above 4 GiB. A process that is not QEMU is refused
// in one line.
func TestAttachNoMonitor(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		name   string
		memMB  int
		args   []string
		ranges []uint64 // sizes: below 4 GiB, then at 4 GiB
	}{
		{"pc-512M", 512, nil, []uint64{512 * mib}},
		{"pc-4G", 4096, nil, []uint64{3072 * mib, 1024 * mib}},
		{"q35-3G", 3072, []string{"-machine", "q35"}, []uint64{2048 * mib, 1024 * mib}},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := plainDebianWith(t, testlinux.Options{MemMB: c.memMB, ExtraArgs: c.args})
			sock := filepath.Join(t.TempDir(), "vm.sock")
			cmd := exec.Command(kvmscopeBin, "--log-level", "info", "attach", "--pid", strconv.Itoa(g.Pid()), "--api", sock)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan struct{})
			go func() { cmd.Wait(); close(exited) }()
			defer func() { cmd.Process.Kill(); <-exited }()
			waitFor(t, 90*time.Second, "attach without a monitor to serve "+sock, func() bool {
				var vm api.VM
				select {
				case <-exited:
					t.Fatalf("attach exited: %s", stderr.String())
				default:
				}
				return api.NewClient(sock).Get(ctxT(t), "/v1/vm", &vm) == nil
			})
			vm := getVM(t, api.NewClient(sock))
			ok := vm.Pid == g.Pid() && len(vm.Regions) == len(c.ranges)
			for i := 0; ok && i < len(c.ranges); i++ {
				gpa := uint64(0)
				if i == 1 {
					gpa = 4 << 30
				}
				ok = uint64(vm.Regions[i].GPA) == gpa && uint64(vm.Regions[i].Size) == c.ranges[i] && strings.HasSuffix(vm.Regions[i].Name, "(inferred)")
			}
			if !ok {
				t.Fatalf("/v1/vm %+v; want RAM of %v bytes at 0 and 4 GiB (stderr %s)", vm, c.ranges, stderr.String())
			}
			checkPS(t, "attached without a monitor", psJSON(t, "--api", sock), g.PS())
		})
	}

	_, errOut, code := kvmscope(t, "attach", "--pid", strconv.Itoa(os.Getpid()), "--api", filepath.Join(t.TempDir(), "x.sock"))
	if code == 0 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, "no guest memory map without a monitor") {
		t.Errorf("attach to a process that is not QEMU: code %d: %q", code, errOut)
	}
}

// plainDebian boots Debian under TCG with no kvmscope at all (QEMU plainly,
// as the responder finds it), shut down at the end of the test.
func plainDebian(t *testing.T) *testlinux.Guest {
	t.Helper()
	return plainDebianWith(t, testlinux.Options{})
}

// plainDebianWith is plainDebian with o's memory and extra arguments.
func plainDebianWith(t *testing.T, o testlinux.Options) *testlinux.Guest {
	t.Helper()
	p := testlinux.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	o.Kernel, o.Accel = p.DebianKernel, "tcg"
	g, err := testlinux.Boot(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// TestAttachNeedsPtraceAccess: attaching to a QEMU of another user, as a
// user without ptrace access to it, is one line that says what attaching
// needs and whose QEMU it is, with and without --ptrace.
func TestAttachNeedsPtraceAccess(t *testing.T) {
	testenv.Require(t, testenv.Root)
	qemuBin := needQEMU(t)
	if _, err := testguest.Build(); err != nil {
		t.Fatalf("build tiny guest: %v", err)
	}
	qemu := exec.Command(qemuBin, testguest.QEMUArgs(1, "tcg", "")...)
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { qemu.Process.Kill(); qemu.Wait() }()
	pid := qemu.Process.Pid
	// Let "nobody" run the binary and write its socket.
	os.Chmod(filepath.Dir(kvmscopeBin), 0o755)
	dir := t.TempDir()
	os.Chmod(dir, 0o777)
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir's parent is 0700
	for _, flags := range [][]string{nil, {"--ptrace"}} {
		cmd := exec.Command(kvmscopeBin, append([]string{"attach", "--pid", strconv.Itoa(pid), "--api", filepath.Join(dir, "vm.sock")}, flags...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		msg := strings.TrimSpace(stderr.String())
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || strings.Contains(msg, "\n") ||
			!strings.Contains(msg, "permission denied; attaching needs ptrace access to QEMU "+strconv.Itoa(pid)+" (it runs as uid 0, kvmscope as 65534)") {
			t.Errorf("attach %v as nobody to root's QEMU: %v, %q; want exit 1 and one line naming what attaching needs", flags, err, msg)
		}
	}
	if !alive(pid) {
		t.Error("QEMU did not survive the refused attaches")
	}
}
