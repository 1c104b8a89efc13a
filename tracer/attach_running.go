//go:build linux && amd64

package tracer

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Attaching to a QEMU that is already running (kvmscope attach --ptrace).
//
// Unlike the launch (Attach), there is no seccomp filter: one cannot be
// put into a running process from outside without injecting seccomp(2),
// and none can be taken out again, so a detach would leave it behind. So
// there is no ioctl policy and no memslot table (the ioctls that built it
// are history); what ptrace gives is the vCPU kick stops (fresh registers,
// register writes), SIGSTOP pauses that every thread honours, and
// injection. The vCPUs are found in /proc (their fds link to
// anon_inode:kvm-vcpu:N), and each one's thread by what it is doing:
// interrupted, a vCPU thread is inside ioctl(its fd, KVM_RUN).

// attachOptions are traceOptions without EXITKILL (a kvmscope that dies
// must leave an attached QEMU running: it never had a filter to fail
// closed) and without following forks and execs (QEMU's helpers are not
// the VM).
const attachOptions = unix.PTRACE_O_TRACESYSGOOD | unix.PTRACE_O_TRACECLONE

// ErrTraced is returned by AttachRunning for a QEMU that another tracer
// (kvmscope run, a debugger) already traces.
var ErrTraced = errors.New("it is traced already (by kvmscope run, or a debugger): attach to that one's API instead")

// AttachRunning seizes every thread of the running QEMU pid and captures
// its KVM VM's vCPUs. Detach (or this process's end: no EXITKILL) lets
// it go, exactly as it was.
//
// While it runs, this process may start children (virsh, for a libvirt
// monitor) only if OwnChildren says so: else the tracer's waitpid takes
// their exits.
func AttachRunning(pid int, log zerolog.Logger) (*Tracer, error) {
	t := newTracer(log, Options{})
	t.waitQEMUOnly(pid)
	started := make(chan error, 1)
	go func() {
		// Locked for good: when Detach ends the loop, the thread exits
		// with the goroutine, and its exit detaches every tracee (the
		// kernel does, as when kvmscope dies).
		runtime.LockOSThread()
		defer close(t.done)
		if err := t.seizeAll(pid); err != nil {
			started <- err
			return
		}
		if err := t.discover(pid); err != nil {
			started <- err
			return
		}
		started <- nil
		t.err = t.loop()
	}()
	if err := <-started; err != nil {
		<-t.done
		return nil, err
	}
	return t, nil
}

// waitQEMUOnly makes the loop wait for QEMU's threads alone when QEMU has
// a process group of its own (libvirt's, a shell job's): waitpid(-pgid)
// takes the stops of tracees in that group and never a child of this
// process, which is in ours. A QEMU in our group (started by the same
// shell job) leaves the loop waiting for everything.
func (t *Tracer) waitQEMUOnly(pid int) {
	pg, err := unix.Getpgid(pid)
	if err == nil && pg > 1 && pg != unix.Getpgrp() {
		t.waitFor = -pg
		t.ownChildren.Store(true)
	}
}

// OwnChildren reports whether this process may start children while
// attached: whether the loop leaves their exits alone (waitQEMUOnly).
func (t *Tracer) OwnChildren() bool { return t.ownChildren.Load() }

// seizeAll seizes the threads of pid until none is left out: a thread
// created meanwhile by a seized one is traced already (TRACECLONE), one
// made by a thread not yet seized shows up in the next listing.
func (t *Tracer) seizeAll(pid int) error {
	t.pid = pid
	t.procs = []int{pid}
	for {
		tids, err := threadsOf(pid)
		if err != nil {
			return err
		}
		fresh := 0
		for _, tid := range tids {
			if t.threads[tid] || userWorker(pid, tid) {
				continue
			}
			if err := ptrace(unix.PTRACE_SEIZE, tid, 0, attachOptions); err != nil {
				if errors.Is(err, unix.ESRCH) {
					continue // it exited
				}
				if errors.Is(err, unix.EPERM) && tracerOf(tid) != 0 {
					return fmt.Errorf("QEMU %d: %w", pid, ErrTraced)
				}
				return fmt.Errorf("ptrace(PTRACE_SEIZE, %d): %w", tid, err)
			}
			t.threads[tid] = true
			t.tgids[tid] = pid
			fresh++
		}
		if fresh == 0 {
			return nil
		}
	}
}

// waitStop waits, a bounded time, for tid's next stop.
func waitStop(tid int) (unix.WaitStatus, bool) {
	var ws unix.WaitStatus
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Microsecond) {
		n, err := unix.Wait4(tid, &ws, unix.WALL|unix.WNOHANG, nil)
		if err != nil {
			return ws, false
		}
		if n == tid {
			return ws, ws.Stopped()
		}
	}
	return ws, false
}

// userWorker reports whether tid is a kernel worker in QEMU's thread group
// (KVM's kvm-nx-lpage-recovery, vhost): it runs kernel code only and
// never stops for ptrace, so it is not seized.
func userWorker(pid, tid int) bool {
	_, worker, _ := taskStopped(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
	return worker
}

// threadsOf lists /proc/PID/task.
func threadsOf(pid int) ([]int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return nil, fmt.Errorf("QEMU %d: %w", pid, err)
	}
	var out []int
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, tid)
		}
	}
	return out, nil
}

// tracerOf is tid's TracerPid (0: none, or unknown).
func tracerOf(tid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "TracerPid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// discover captures the KVM VM of the running QEMU pid: its VM fd and
// each vCPU fd (pidfd_getfd, kvm_run mapped with sync regs requested, as
// at KVM_CREATE_VCPU under run), each vCPU matched to its thread.
func (t *Tracer) discover(pid int) error {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("QEMU %d: %w", pid, err)
	}
	vmFD := -1
	vcpuFDs := map[int]int{} // fd -> vCPU id
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue
		}
		switch {
		case link == "anon_inode:kvm-vm":
			if vmFD >= 0 {
				return fmt.Errorf("QEMU %d has two KVM VMs (fds %d and %d)", pid, vmFD, fd)
			}
			vmFD = fd
		case strings.HasPrefix(link, "anon_inode:kvm-vcpu:"):
			id, err := strconv.Atoi(strings.TrimPrefix(link, "anon_inode:kvm-vcpu:"))
			if err != nil {
				continue
			}
			vcpuFDs[fd] = id
		}
	}
	if vmFD < 0 {
		return fmt.Errorf("QEMU %d has no KVM VM (a TCG guest: attach without --ptrace)", pid)
	}
	// A vCPU thread is outside KVM_RUN now and then (an exit QEMU
	// handles, QEMU still starting): look again, for up to 2 s.
	threadOf := map[int]int{}
	for try := 0; try < 20 && len(threadOf) < len(vcpuFDs); try++ {
		if try > 0 {
			time.Sleep(100 * time.Millisecond)
		}
		maps.Copy(threadOf, t.vcpuThreads(vcpuFDs, threadOf))
	}
	t.vm.created(pid, vmFD)
	for fd, id := range vcpuFDs {
		tid, ok := threadOf[fd]
		if !ok {
			return fmt.Errorf("QEMU %d: vCPU %d (fd %d): no thread is in KVM_RUN on it (is the VM paused? attach to a running one)", pid, id, fd)
		}
		t.vm.vcpuCreated(tid, vmFD, id, fd)
	}
	if len(t.vm.VCPUs()) != len(vcpuFDs) {
		return fmt.Errorf("QEMU %d: captured %d of %d vCPUs (see the log)", pid, len(t.vm.VCPUs()), len(vcpuFDs))
	}
	return nil
}

// vcpuThreads interrupts each seized thread not in found once and returns,
// by vCPU fd, the threads found inside ioctl(fd, KVM_RUN): the interrupt makes
// KVM_RUN return to QEMU with EINTR, as QEMU's own kick does, and the
// stop shows the call's number and arguments. Each thread goes on at
// once, with any signal its stop was for.
func (t *Tracer) vcpuThreads(fds, found map[int]int) map[int]int {
	out := map[int]int{}
	for tid := range t.threads {
		if slices.Contains(slices.Collect(maps.Values(found)), tid) {
			continue
		}
		if interrupt(tid) != nil {
			continue
		}
		ws, ok := waitStop(tid)
		if !ok {
			// Gone, or not stopping within the bound: the main loop
			// takes its stop when it comes.
			continue
		}
		var regs unix.PtraceRegs
		if unix.PtraceGetRegs(tid, &regs) == nil && regs.Orig_rax == unix.SYS_IOCTL && regs.Rsi == KVMRun {
			if _, ok := fds[int(regs.Rdi)]; ok {
				out[int(regs.Rdi)] = tid
			}
		}
		sig := 0
		if event := int(ws>>16) & 0xff; event == 0 && ws.StopSignal() != unix.SIGTRAP {
			sig = int(ws.StopSignal()) // a signal-delivery stop came first
		}
		cont(tid, sig)
	}
	return out
}

// Detach lets an attached QEMU go (AttachRunning): kvm_run's
// kvm_valid_regs is put back as it was, and the tracer's thread ends,
// which detaches every thread (the kernel resumes them; one in a pause's
// group-stop stays stopped until the pause's SIGCONT). It returns once
// QEMU is untraced.
func (t *Tracer) Detach() {
	t.vm.restoreSyncRegs()
	// The loop is blocked in waitpid: a kick of one vCPU (QEMU's own
	// SIGUSR1, harmless) gives it a stop to see the request at.
	for _, c := range t.vm.VCPUs() {
		unix.Tgkill(t.pid, c.TID, unix.SIGUSR1)
		break
	}
	<-t.done
}

// restoreSyncRegs marks the VM detached, so snapshots stop asking KVM for
// registers, and puts every vCPU's kvm_valid_regs back as it was found.
func (v *VM) restoreSyncRegs() {
	v.detached.Store(true)
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, c := range v.vcpus {
		c.mu.Lock()
		if !c.gone {
			c.run.restoreSyncRegs()
		}
		c.mu.Unlock()
	}
}
