package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// TestAttachPtrace (issue 12): the tiny guest under KVM, started plainly
// in regs mode, is attached to with --ptrace --allow-write: its vCPUs
// are the ones QEMU made, found with their threads, their registers come
// fresh from kvm_run, a register write and an MSR write change what the
// guest does (it reads the MSR with rdmsr), and a memory write across a
// hole fails whole. Detach leaves QEMU untraced
// and running (the counter goes on), a second attach works, kill -9 of
// an attached kvmscope leaves QEMU running too, and QEMU's exit is its
// plain one.
func TestAttachPtrace(t *testing.T) {
	args := tinyGuest(t, 2, "regs")
	dir := t.TempDir()
	qmp := filepath.Join(dir, "qmp.sock")
	// A second monitor for the test itself: kvmscope holds the first.
	qmp2 := filepath.Join(dir, "qmp2.sock")
	qemu := exec.Command(needQEMU(t), append(args, "-qmp", "unix:"+qmp+",server=on,wait=off", "-qmp", "unix:"+qmp2+",server=on,wait=off")...)
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { qemu.Process.Kill(); qemu.Wait() }()
	pid := qemu.Process.Pid
	waitFor(t, 20*time.Second, "QEMU's QMP socket", func() bool { _, err := os.Stat(qmp); return err == nil })
	sock := filepath.Join(dir, "vm.sock")
	attach := func(flags ...string) *exec.Cmd {
		t.Helper()
		a := append([]string{"--log-level", "info", "attach", "--pid", strconv.Itoa(pid), "--qmp", qmp, "--api", sock}, flags...)
		cmd := exec.Command(kvmscopeBin, a...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
			if t.Failed() {
				t.Logf("attach %v stderr:\n%s", flags, stderr.String())
			}
		})
		waitFor(t, 30*time.Second, "attach to serve "+sock, func() bool {
			var vm api.VM
			return api.NewClient(sock).Get(ctxT(t), "/v1/vm", &vm) == nil
		})
		return cmd
	}

	cmd := attach("--ptrace", "--allow-write")
	c := api.NewClient(sock)
	waitReady(t, c)
	vm := getVM(t, c)
	if vm.Accel != "kvm" || len(vm.VCPUs) != 2 || vm.TracerPid != cmd.Process.Pid || !vm.Writable {
		t.Fatalf("/v1/vm %+v", vm)
	}
	for _, v := range vm.VCPUs {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", pid, v.TID)); err != nil || v.TID == pid {
			t.Errorf("vCPU %d: thread %d is not one of QEMU's vCPU threads (%v)", v.ID, v.TID, err)
		}
	}
	// TracerPid names the tracing thread: one of the attached kvmscope's.
	if tr := tracerPid(t, pid); tr == 0 || func() error { _, err := os.Stat(fmt.Sprintf("/proc/%d/task/%d", cmd.Process.Pid, tr)); return err }() != nil {
		t.Fatalf("QEMU's tracer is %d, not a thread of the attached kvmscope %d", tr, cmd.Process.Pid)
	}
	var cpus []api.VCPU
	if err := c.Get(ctxT(t), "/v1/vcpus", &cpus); err != nil || len(cpus) != 2 || cpus[0].Mode != "long" {
		t.Fatalf("/v1/vcpus %+v (%v)", cpus, err)
	}

	// An MSR write (KVM_SET_MSRS injected into the attached QEMU) is what
	// the guest's own rdmsr reads.
	if _, errOut, code := kvmscope(t, "regs", "set", "--api", sock, "--vcpu", "0", "kernel_gs_base=0xffff888000abc000"); code != 0 {
		t.Fatalf("regs set kernel_gs_base: code %d: %s", code, errOut)
	}
	waitFor(t, 30*time.Second, "the guest's rdmsr to read the MSR written", func() bool {
		return readU64(t, c, testguest.MSRSeenGPA) == 0xffff888000abc000
	})
	// Stopped by its monitor, QEMU may hold a copy of the MSRs that it
	// writes back at cont, which an attached kvmscope cannot see: refused.
	qctx, q := dialQMP(t, qmp2)
	if _, err := q.Execute(qctx, "stop", nil); err != nil {
		t.Fatal(err)
	}
	_, errOut, code := kvmscope(t, "regs", "set", "--api", sock, "--vcpu", "0", "kernel_gs_base=0x1000")
	refused(t, "an MSR write to a stopped VM under attach", errOut, code, "resume it first")
	if _, err := q.Execute(qctx, "cont", nil); err != nil {
		t.Fatal(err)
	}

	// A register write makes the guest publish what only the host knows.
	const seen = 0x5eed
	_, errOut, code = kvmscope(t, "regs", "set", "--api", sock, "--vcpu", "0", fmt.Sprintf("r15=%#x", uint64(testguest.RegsMagic)), fmt.Sprintf("r14=%#x", seen))

	if code != 0 {
		t.Fatalf("regs set: code %d: %s", code, errOut)
	}
	waitFor(t, 30*time.Second, "the guest to see r15", func() bool { return readU64(t, c, testguest.RegsDoneGPA) == 1 })
	if got := readU64(t, c, testguest.RegsSeenGPA); got != seen {
		t.Errorf("the guest saw r14 = %#x, want %#x", got, seen)
	}
	// Memory writes: one across a hole fails whole, one that lands reads
	// back.
	writeAcrossHole(t, c, vm)
	gpa := uint64(testguest.StatusGPA + 0x800)
	if err := c.Put(ctxT(t), fmt.Sprintf("/v1/memory?gpa=%#x", gpa), []byte("attached")); err != nil {
		t.Fatal(err)
	}
	if got := readMem(t, c, gpa, 8); string(got) != "attached" {
		t.Errorf("read back %q", got)
	}

	// Detach: untraced, running, kvm_run as it was.
	counter := readU64(t, c, testguest.CounterGPA)
	if _, errOut, code := kvmscope(t, "detach", "--api", sock); code != 0 {
		t.Fatalf("detach: code %d: %s", code, errOut)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("attach after detach: %v", err)
	}
	waitFor(t, 10*time.Second, "QEMU to be untraced", func() bool { return tracerPid(t, pid) == 0 })

	// Again, and this time kvmscope is killed: QEMU runs on untraced.
	cmd = attach("--ptrace")
	waitFor(t, 10*time.Second, "the counter to go on after a detach", func() bool { return readU64(t, c, testguest.CounterGPA) > counter })
	counter = readU64(t, c, testguest.CounterGPA)
	if _, errOut, code := kvmscope(t, "regs", "set", "--api", sock, "--vcpu", "0", "r15=1"); code == 0 || !strings.Contains(errOut, "allow-write") {
		t.Errorf("regs set without --allow-write: code %d: %s", code, errOut)
	}
	cmd.Process.Kill()
	cmd.Wait()
	waitFor(t, 10*time.Second, "QEMU to be untraced after kill -9", func() bool { return tracerPid(t, pid) == 0 })
	cmd = attach() // read-only, without ptrace: it sees the counter go on
	waitFor(t, 10*time.Second, "the counter to go on after kill -9", func() bool { return readU64(t, c, testguest.CounterGPA) > counter })
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()

	// A QEMU that kvmscope run traces is refused, in one line.
	runQMP := filepath.Join(dir, "run-qmp.sock")
	r := startRun(t, nil, append(tinyGuest(t, 1, ""), "-qmp", "unix:"+runQMP+",server=on,wait=off")...)
	waitReady(t, r.client())
	_, errOut, code = kvmscope(t, "attach", "--pid", strconv.Itoa(qemuPid(t, r)), "--qmp", runQMP, "--ptrace", "--api", filepath.Join(dir, "other.sock"))
	if code == 0 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, "traced already") {
		t.Errorf("attach --ptrace to a VM under run: code %d: %q", code, errOut)
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
