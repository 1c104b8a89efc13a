package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// TestLibvirtAttachPtrace: attach --ptrace --vm to a libvirt KVM domain
// that runs plain QEMU. Monitor commands go through virsh, children of
// the attached kvmscope, while it traces QEMU: the trace must leave their
// exits alone. Registers and MSRs are written, a write to the VM libvirt
// suspended is refused (which only a monitor answer can tell), and
// detach leaves the domain running and untraced.
func TestLibvirtAttachPtrace(t *testing.T) {
	testenv.Require(t, testenv.QEMU, testenv.KVM)
	needLibvirt(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	elf, err := testguest.Build()
	if err != nil {
		t.Fatalf("build the tiny guest: %v", err)
	}
	dir := filepath.Join(binDir, "kvm-attach")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(dir, "tinyguest.elf")
	copyFile(t, elf, kernel)
	cfg, err := launch.LoadConfig(launch.DefaultConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("kvmscope-test-ptrace-%d", os.Getpid())
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(kvmDomainXML(name, kernel, "regs", testguest.Firmware(), qemu, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	mustVirsh(t, "define", xmlPath)
	t.Cleanup(func() {
		virsh(t, "destroy", name)
		virsh(t, "undefine", name)
		os.Remove("/var/log/libvirt/qemu/" + name + ".log")
	})
	mustVirsh(t, "start", name)
	pid := readPidFile(t, "/run/libvirt/qemu/"+name+".pid")

	sock := filepath.Join(cfg.SocketDir, name+".sock")
	attach := exec.Command(kvmscopeBin, "--log-level", "info", "attach", "--vm", name, "--ptrace", "--allow-write")
	var stderr strings.Builder
	attach.Stderr = &stderr
	if err := attach.Start(); err != nil {
		t.Fatal(err)
	}
	attached := make(chan error, 1)
	go func() { attached <- attach.Wait() }()
	defer func() {
		attach.Process.Kill()
		if t.Failed() {
			t.Logf("kvmscope attach --vm --ptrace stderr:\n%s", stderr.String())
		}
	}()
	waitFile(t, sock, 60*time.Second)
	c := api.NewClient(sock)
	u64 := func(gpa uint64) uint64 {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		b, err := c.GetRaw(ctx, "/v1/memory?"+url.Values{"gpa": {fmt.Sprintf("%#x", gpa)}, "len": {"8"}}.Encode())
		if err != nil {
			t.Fatalf("read %#x: %v", gpa, err)
		}
		return binary.LittleEndian.Uint64(b)
	}
	until := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	until("the tiny guest's ready marker", func() bool { return u64(testguest.ReadyGPA) == testguest.ReadyValue })
	var vm api.VM
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Get(ctx, "/v1/vm", &vm); err != nil {
		t.Fatal(err)
	}
	if vm.Pid != pid || vm.TracerPid != attach.Process.Pid || vm.Accel != "kvm" || !vm.Writable || len(vm.VCPUs) != 1 || vm.VCPUs[0].TID == 0 {
		t.Fatalf("/v1/vm %+v; want QEMU %d traced by %d, KVM, writable, one vCPU with its thread", vm, pid, attach.Process.Pid)
	}

	// Suspended by libvirt: the attached kvmscope asks the monitor (a
	// virsh child) and refuses an MSR write QEMU could undo at resume.
	mustVirsh(t, "suspend", name)
	r := cli(t, "regs", "set", "--vm", name, "--vcpu", "0", "kernel_gs_base=0x1000")
	if r.code == 0 || !strings.Contains(r.stderr, "resume it first") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Errorf("an MSR write to the suspended domain: code %d: %q; want one line saying to resume it first", r.code, r.stderr)
	}
	mustVirsh(t, "resume", name)
	const gsBase = 0xffff888000abc000
	if r := cli(t, "regs", "set", "--vm", name, "--vcpu", "0", fmt.Sprintf("kernel_gs_base=%#x", uint64(gsBase))); r.code != 0 {
		t.Fatalf("regs set kernel_gs_base: code %d: %s", r.code, r.stderr)
	}
	until("the guest's rdmsr to read the MSR written", func() bool { return u64(testguest.MSRSeenGPA) == gsBase })
	const seen = 0x5eed
	if r := cli(t, "regs", "set", "--vm", name, "--vcpu", "0", fmt.Sprintf("r15=%#x", uint64(testguest.RegsMagic)), fmt.Sprintf("r14=%#x", seen)); r.code != 0 {
		t.Fatalf("regs set r15, r14: code %d: %s", r.code, r.stderr)
	}
	until("the guest to see r15", func() bool { return u64(testguest.RegsDoneGPA) == 1 })
	if got := u64(testguest.RegsSeenGPA); got != seen {
		t.Errorf("the guest saw r14 = %#x, want %#x", got, seen)
	}

	// Detach: the domain runs on, untraced, as libvirt sees it.
	if r := cli(t, "detach", "--vm", name); r.code != 0 {
		t.Fatalf("detach --vm %s: code %d\n%s", name, r.code, r.stderr)
	}
	select {
	case err := <-attached:
		if err != nil {
			t.Errorf("kvmscope attach after detach: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("kvmscope attach did not end after detach")
	}
	until("QEMU to be untraced", func() bool { return strings.Contains(procStatus(pid), "TracerPid:\t0\n") })
	if st := strings.TrimSpace(mustVirsh(t, "domstate", name)); st != "running" || !alive(pid) {
		t.Errorf("%s after detach: %s (QEMU alive: %v)", name, st, alive(pid))
	}
}
