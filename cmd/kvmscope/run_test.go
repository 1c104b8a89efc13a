package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
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

// needKVM runs the test only where QEMU and KVM are (the gate defers it
// to the nested-KVM lab otherwise).
func needKVM(t *testing.T) {
	t.Helper()
	testenv.Require(t, testenv.QEMU, testenv.KVM)
}

// tinyGuest returns QEMU args for the tiny guest under KVM.
func tinyGuest(t *testing.T, smp int, cmdline string) []string {
	t.Helper()
	needKVM(t)
	if _, err := testguest.Build(); err != nil {
		t.Fatalf("build tiny guest: %v", err)
	}
	return testguest.QEMUArgs(smp, "kvm", cmdline)
}

func readMem(t *testing.T, c *api.Client, gpa uint64, n int) []byte {
	t.Helper()
	q := url.Values{"gpa": {fmt.Sprintf("%#x", gpa)}, "len": {strconv.Itoa(n)}}
	b, err := c.GetRaw(ctxT(t), "/v1/memory?"+q.Encode())
	if err != nil {
		t.Fatalf("read %#x+%d: %v", gpa, n, err)
	}
	return b
}

func readU64(t *testing.T, c *api.Client, gpa uint64) uint64 {
	return binary.LittleEndian.Uint64(readMem(t, c, gpa, 8))
}

// waitFor polls cond every 20 ms until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitReady waits until the tiny guest says it is in long mode with its
// patterns written.
func waitReady(t *testing.T, c *api.Client) {
	t.Helper()
	waitFor(t, 60*time.Second, "the tiny guest's ready marker", func() bool {
		q := url.Values{"gpa": {fmt.Sprintf("%#x", testguest.ReadyGPA)}, "len": {"8"}}
		b, err := c.GetRaw(ctxT(t), "/v1/memory?"+q.Encode())
		return err == nil && binary.LittleEndian.Uint64(b) == testguest.ReadyValue
	})
}

func getVM(t *testing.T, c *api.Client) api.VM {
	t.Helper()
	var vm api.VM
	if err := c.Get(ctxT(t), "/v1/vm", &vm); err != nil {
		t.Fatal(err)
	}
	return vm
}

// TestKVMCapture is the heart of issue 2: under -accel kvm, kvmscope sees
// every vCPU, the memslots, guest memory and fresh registers while the
// guest runs.
func TestKVMCapture(t *testing.T) {
	for _, smp := range []int{1, 4} {
		t.Run(fmt.Sprintf("smp%d", smp), func(t *testing.T) {
			r := startRun(t, nil, tinyGuest(t, smp, "")...)
			c := r.client()
			waitReady(t, c)

			vm := getVM(t, c)
			if vm.Accel != "kvm" || len(vm.VCPUs) != smp {
				t.Fatalf("vm = %+v; want accel kvm with %d vCPUs", vm, smp)
			}
			for i, v := range vm.VCPUs {
				if v.ID != i || v.TID == 0 {
					t.Errorf("vCPU %d = %+v; want id %d and its QEMU thread", i, v, i)
				}
			}
			// Memslots cover guest RAM: low memory and everything from 1 MiB
			// to the end of RAM.
			covered := func(lo, hi uint64) bool {
				for _, m := range vm.Memslots {
					if m.AddressSpace == 0 && uint64(m.GPA) <= lo && hi <= uint64(m.GPA)+uint64(m.Size) {
						return true
					}
				}
				return false
			}
			if !covered(0, 0xa0000) || !covered(0x100000, testguest.MemoryMiB<<20) {
				t.Errorf("memslots do not cover guest RAM: %+v", vm.Memslots)
			}

			for i := 0; i < testguest.PatternPages; i++ {
				got := readMem(t, c, testguest.PatternGPA+uint64(i)*testguest.PageSize, testguest.PageSize)
				if !bytes.Equal(got, testguest.PatternFor(i)) {
					t.Fatalf("pattern page %d differs: %q...", i, got[:64])
				}
			}
			// A read crossing from one pattern page into the next.
			cross := readMem(t, c, testguest.PatternGPA+testguest.PageSize-16, 32)
			if want := append(testguest.PatternFor(0)[testguest.PageSize-16:], testguest.PatternFor(1)[:16]...); !bytes.Equal(cross, want) {
				t.Errorf("page-crossing read = %q, want %q", cross, want)
			}

			// The counter advances while we read: QEMU is never stopped.
			c1 := readU64(t, c, testguest.CounterGPA)
			waitFor(t, 10*time.Second, "the guest counter to advance", func() bool {
				return readU64(t, c, testguest.CounterGPA) > c1
			})

			var cpus []api.VCPU
			if err := c.Get(ctxT(t), "/v1/vcpus", &cpus); err != nil {
				t.Fatal(err)
			}
			if len(cpus) != smp {
				t.Fatalf("got %d vCPUs, want %d", len(cpus), smp)
			}
			boot := cpus[0]
			if uint64(boot.CR3) != testguest.PML4GPA || boot.Mode != "long" ||
				uint64(boot.RIP) < testguest.CodeStart || uint64(boot.RIP) >= testguest.CodeEnd {
				t.Errorf("boot vCPU = %+v; want CR3 %#x, long mode, RIP in [%#x,%#x)", boot, testguest.PML4GPA, testguest.CodeStart, testguest.CodeEnd)
			}
			// Registers are fresh: two samples of a spinning vCPU differ.
			var again []api.VCPU
			if err := c.Get(ctxT(t), "/v1/vcpus", &again); err != nil {
				t.Fatal(err)
			}
			if again[0].RIP == boot.RIP && again[0].RSP == boot.RSP && again[0].RFLAGS == boot.RFLAGS {
				t.Logf("note: two samples gave the same RIP %#x (possible for a tight loop)", uint64(boot.RIP))
			}

			// A hole (past the end of RAM) gives an error naming the
			// address; a read running into it too.
			_, err := c.GetRaw(ctxT(t), "/v1/memory?gpa=0x8000000&len=16")
			if err == nil || !strings.Contains(err.Error(), "0x8000000") {
				t.Errorf("read past RAM: err = %v; want an error naming 0x8000000", err)
			}
			_, err = c.GetRaw(ctxT(t), fmt.Sprintf("/v1/memory?gpa=%#x&len=32", testguest.MemoryMiB<<20-16))
			if err == nil || !strings.Contains(err.Error(), "0x4000000") {
				t.Errorf("read running off the end of RAM: err = %v; want an error naming 0x4000000", err)
			}
			// Writes are refused without --allow-write.
			if out, errOut, code := kvmscope(t, "vcpus", "--api", r.sock, "--json"); code != 0 || !strings.Contains(out, `"cr3": "0x104000"`) {
				t.Errorf("kvmscope vcpus --json: code %d, out %s, err %s", code, out, errOut)
			}
		})
	}
}

func TestGuestExitStatus(t *testing.T) {
	r := startRun(t, nil, tinyGuest(t, 1, "exit=5")...)
	if code := r.wait(60 * time.Second); code != testguest.ExitStatus(5) {
		t.Fatalf("kvmscope exit code %d, want QEMU's %d", code, testguest.ExitStatus(5))
	}
}

// qemuPid returns the pid of the QEMU that owns the VM.
func qemuPid(t *testing.T, r *running) int {
	t.Helper()
	c := r.client()
	var pid int
	waitFor(t, 20*time.Second, "QEMU to create its VM", func() bool {
		var vm api.VM
		if c.Get(ctxT(t), "/v1/vm", &vm) == nil && vm.Pid != 0 && vm.Accel == "kvm" {
			pid = vm.Pid
			return true
		}
		return false
	})
	return pid
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie is dead for our purposes.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || len(b) < i+3 || b[i+2] != 'Z'
}

func TestSIGTERMEndsQEMU(t *testing.T) {
	r := startRun(t, nil, tinyGuest(t, 2, "")...)
	pid := qemuPid(t, r)
	// QEMU installs its SIGTERM handler during start-up; before that the
	// signal kills it, with or without kvmscope. Wait until the guest runs.
	waitReady(t, r.client())
	r.cmd.Process.Signal(syscall.SIGTERM)
	code := r.wait(20 * time.Second)
	if alive(pid) {
		t.Fatalf("QEMU %d still alive after kvmscope exited", pid)
	}
	// QEMU exits 0 on SIGTERM ("terminating on signal 15").
	if code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want QEMU's 0", code)
	}
	waitFor(t, 10*time.Second, "the tracer to remove the API socket", func() bool {
		_, err := os.Stat(r.sock)
		return os.IsNotExist(err)
	})
}

// TestKill9FailsClosed: if kvmscope's tracer is killed, QEMU must not
// linger with a seccomp filter whose trapped ioctls now fail: the kernel
// kills it (PTRACE_O_EXITKILL). The analysis process goes with them.
func TestKill9FailsClosed(t *testing.T) {
	r := startRun(t, nil, tinyGuest(t, 1, "")...)
	pid := qemuPid(t, r)
	vm := getVM(t, r.client())
	if vm.TracerPid == 0 || vm.TracerPid == pid {
		t.Fatalf("tracer pid %d, QEMU pid %d", vm.TracerPid, pid)
	}
	syscall.Kill(vm.TracerPid, syscall.SIGKILL)
	if code := r.wait(10 * time.Second); code != 128+int(syscall.SIGKILL) {
		t.Errorf("QEMU exit code %d, want %d (killed with its tracer)", code, 128+int(syscall.SIGKILL))
	}
	waitFor(t, 10*time.Second, "QEMU to die with its tracer", func() bool { return !alive(pid) })
	// The analysis process sees its tracer hang up and goes too.
	waitFor(t, 10*time.Second, "the analysis process to end with its tracer", func() bool { return !alive(vm.AnalysisPid) })
}

// TestTransparentLaunch: QEMU gets our argv, environment, cwd and every
// inherited fd at its number.
func TestTransparentLaunch(t *testing.T) {
	args := tinyGuest(t, 1, "")
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "inherited"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sock := filepath.Join(dir, "api.sock")
	qemu := needQEMU(t)
	cmd := exec.Command(kvmscopeBin, append([]string{"run", "--api", sock, "--", qemu}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "KVMSCOPE_TEST_MARK=transparent")
	cmd.ExtraFiles = []*os.File{nil, nil, f} // fd 5 (3 and 4 closed)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	r := &running{t: t, cmd: cmd, sock: sock, stderr: &stderr, done: make(chan struct{})}
	pid := qemuPid(t, r)
	// In-place launch: the process we started is QEMU itself (libvirt
	// finds the vCPU threads under the pid it started).
	if pid != cmd.Process.Pid {
		t.Errorf("QEMU runs as pid %d, not as the launched process %d", pid, cmd.Process.Pid)
	}

	if link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/5", pid)); err != nil || link != f.Name() {
		t.Errorf("QEMU fd 5 = %q, %v; want %s", link, err, f.Name())
	}
	if cwd, _ := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid)); cwd != dir {
		t.Errorf("QEMU cwd = %q, want %q", cwd, dir)
	}
	env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if !bytes.Contains(env, []byte("KVMSCOPE_TEST_MARK=transparent\x00")) {
		t.Errorf("QEMU environment lacks KVMSCOPE_TEST_MARK")
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	want := strings.Join(append([]string{qemu}, args...), "\x00") + "\x00"
	if string(cmdline) != want {
		t.Errorf("QEMU argv = %q\nwant       %q", cmdline, want)
	}
	// Our own fds (API socket, kvm_run mappings) must not leak into QEMU.
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if strings.Contains(l, "api.sock") || strings.Contains(l, "status") {
			t.Errorf("QEMU has kvmscope's fd %s -> %s", fd.Name(), l)
		}
	}
}

// TestDaemonize: libvirt probes and starts QEMU with -daemonize. The command
// returns when QEMU's first process does, the pid file names the daemon,
// and the daemon stays traced and served.
func TestDaemonize(t *testing.T) {
	args := tinyGuest(t, 1, "")
	dir := t.TempDir()
	pidfile := filepath.Join(dir, "qemu.pid")
	sock := filepath.Join(dir, "api.sock")
	out, errOut, code := kvmscope(t, append([]string{"run", "--api", sock, "--", needQEMU(t)}, append(args, "-daemonize", "-pidfile", pidfile)...)...)
	if code != 0 {
		t.Fatalf("kvmscope run -daemonize: code %d\n%s%s", code, out, errOut)
	}
	b, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	defer syscall.Kill(pid, syscall.SIGKILL)
	if !alive(pid) {
		t.Fatalf("daemon %d named by the pid file is not running", pid)
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if strings.Contains(string(status), "TracerPid:\t0\n") {
		t.Fatalf("the QEMU daemon is not traced")
	}
	r := &running{t: t, sock: sock, done: make(chan struct{}), stderr: &bytes.Buffer{}}
	c := r.client()
	waitReady(t, c)
	if vm := getVM(t, c); vm.Pid != pid || len(vm.VCPUs) != 1 {
		t.Fatalf("vm = %+v; want pid %d with 1 vCPU", vm, pid)
	}
	syscall.Kill(pid, syscall.SIGTERM)
	waitFor(t, 20*time.Second, "the detached tracer to remove its socket", func() bool {
		_, err := os.Stat(sock)
		return os.IsNotExist(err)
	})
}

// TestOtherUIDRefused: only root and the owner may use the API.
func TestOtherUIDRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to act as another uid")
	}
	r := startRun(t, nil, tinyGuest(t, 1, "")...)
	r.client()
	// Let "nobody" reach the binary and the socket's directory, and even
	// open the socket file: the server must still refuse it by SO_PEERCRED.
	os.Chmod(filepath.Dir(kvmscopeBin), 0o755)
	os.Chmod(filepath.Dir(r.sock), 0o755)
	os.Chmod(filepath.Dir(filepath.Dir(r.sock)), 0o755) // t.TempDir's parent is 0700
	asNobody := func() (string, int) {
		cmd := exec.Command(kvmscopeBin, "vm", "--api", r.sock)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		var errb bytes.Buffer
		cmd.Stderr = &errb
		err := cmd.Run()
		if ee, ok := err.(*exec.ExitError); ok {
			return errb.String(), ee.ExitCode()
		}
		return errb.String(), 0
	}
	if msg, code := asNobody(); code == 0 || !strings.Contains(msg, "permission denied") {
		t.Errorf("uid 65534 with a 0600 socket: code %d, %q; want permission denied", code, msg)
	}
	os.Chmod(r.sock, 0o666)
	if msg, code := asNobody(); code == 0 || !strings.Contains(msg, "may not use this socket") {
		t.Errorf("uid 65534 with the socket opened up: code %d, %q; want refused by peer credentials", code, msg)
	}
}

// TestLinuxBannerTCG: a real Linux guest under TCG; its "Linux version"
// banner is found in guest memory through the API.
func TestLinuxBannerTCG(t *testing.T) {
	p := testlinux.Require(t)
	r := startRun(t, nil, "-accel", "tcg", "-m", "512", "-smp", "2", "-display", "none", "-serial", "none",
		"-monitor", "none", "-no-reboot", "-kernel", p.DebianKernel, "-initrd", p.Initrd, "-append", "console=ttyS0 panic=-1")
	c := r.client()
	var banner string
	waitFor(t, 90*time.Second, "the Linux banner in guest memory", func() bool {
		var vm api.VM
		if c.Get(ctxT(t), "/v1/vm", &vm) != nil || vm.Accel != "tcg" {
			return false
		}
		for _, rg := range vm.Regions {
			if rg.ReadOnly {
				continue
			}
			for off := uint64(0); off < uint64(rg.Size); off += 8 << 20 {
				n := min(uint64(rg.Size)-off, 8<<20)
				q := url.Values{"gpa": {fmt.Sprintf("%#x", uint64(rg.GPA)+off)}, "len": {strconv.FormatUint(n, 10)}}
				b, err := c.GetRaw(ctxT(t), "/v1/memory?"+q.Encode())
				if err != nil {
					continue
				}
				if i := bytes.Index(b, []byte("Linux version 6.")); i >= 0 {
					end := bytes.IndexByte(b[i:], 0)
					if end < 0 || end > 300 {
						end = 80
					}
					banner = string(b[i : i+end])
					return true
				}
			}
		}
		time.Sleep(500 * time.Millisecond)
		return false
	})
	t.Logf("found %q", banner)
	var cpus []api.VCPU
	if err := c.Get(ctxT(t), "/v1/vcpus", &cpus); err != nil || len(cpus) != 2 {
		t.Fatalf("TCG vcpus: %v, %+v", err, cpus)
	}
}

// TestStopContHonoured: a SIGSTOP sent to QEMU (by a user, or by
// `ps --consistent`) stops the guest under the tracer, and SIGCONT resumes
// it; the tracer must not swallow the group-stop.
func TestStopContHonoured(t *testing.T) {
	r := startRun(t, nil, tinyGuest(t, 1, "")...)
	pid := qemuPid(t, r)
	c := r.client()
	waitReady(t, c)
	syscall.Kill(pid, syscall.SIGSTOP)
	waitFor(t, 5*time.Second, "QEMU's threads to stop", func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		i := bytes.LastIndexByte(b, ')')
		return i > 0 && len(b) > i+2 && (b[i+2] == 't' || b[i+2] == 'T')
	})
	time.Sleep(100 * time.Millisecond)
	c1 := readU64(t, c, testguest.CounterGPA)
	time.Sleep(300 * time.Millisecond)
	if c2 := readU64(t, c, testguest.CounterGPA); c2 != c1 {
		t.Errorf("counter moved from %d to %d while QEMU was stopped", c1, c2)
	}
	syscall.Kill(pid, syscall.SIGCONT)
	waitFor(t, 10*time.Second, "the counter to move after SIGCONT", func() bool {
		return readU64(t, c, testguest.CounterGPA) > c1
	})
}

// TestUnprivileged: kvmscope needs no root; a user that may open /dev/kvm
// (here: nobody, in group kvm, as libvirt-qemu is) runs a VM under it and
// reads it.
func TestUnprivileged(t *testing.T) {
	testenv.Require(t, testenv.Root, testenv.QEMU, testenv.KVM)
	kvmGroup, err := user.LookupGroup("kvm")
	if err != nil {
		t.Fatalf("no kvm group (scripts/setup.sh creates it): %v", err)
	}
	gid, _ := strconv.Atoi(kvmGroup.Gid)
	var st syscall.Stat_t
	if syscall.Stat("/dev/kvm", &st) != nil || int(st.Gid) != gid || st.Mode&0o060 != 0o060 {
		t.Fatal("/dev/kvm is not group kvm rw (scripts/setup.sh sets it)")
	}
	elf, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir's parent is 0700
	os.Chmod(dir, 0o777)
	os.Chmod(filepath.Dir(kvmscopeBin), 0o755)
	kernel := filepath.Join(dir, "tinyguest.elf")
	b, err := os.ReadFile(elf)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(kernel, b, 0o644)
	sock := filepath.Join(dir, "api.sock")
	args := append([]string{"run", "--api", sock, "--", needQEMU(t)}, testguest.KernelArgs(kernel, 2, "kvm", "")...)
	cmd := exec.Command(kvmscopeBin, args...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{uint32(gid)}}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := &running{t: t, cmd: cmd, sock: sock, stderr: &stderr, done: make(chan struct{})}
	go func() { r.err = cmd.Wait(); close(r.done) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		r.wait(20 * time.Second)
		if t.Failed() {
			t.Logf("stderr: %s", stderr.String())
		}
	}()
	c := r.client()
	waitReady(t, c)
	vm := getVM(t, c)
	if len(vm.VCPUs) != 2 {
		t.Fatalf("vm = %+v", vm)
	}
	st2, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", vm.Pid))
	if !strings.Contains(string(st2), "Uid:\t65534") {
		t.Errorf("QEMU does not run as uid 65534")
	}
	// Root may read it too (root and the owner).
	if out, errOut, code := kvmscope(t, "vcpus", "--api", sock, "--json"); code != 0 || !strings.Contains(out, "0x104000") {
		t.Errorf("root reading nobody's VM: %d %s", code, errOut)
	}
}
