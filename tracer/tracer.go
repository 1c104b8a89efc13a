//go:build linux && amd64

package tracer

import (
	"errors"
	"fmt"
	"sync"
	"syscall"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Tracer owns a traced QEMU and the VM it creates.
type Tracer struct {
	log    zerolog.Logger
	pid    int // the seized process, which becomes QEMU at its execve
	vm     *VM
	leader chan struct{}      // closed when the first process exits
	status syscall.WaitStatus // its wait status, valid after leader closes
	done   chan struct{}      // closed when no traced task is left
	err    error              // loop error, valid after done closes

	// procs is the set of live traced processes (thread-group ids), to
	// find QEMU's daemon after -daemonize forks it.
	procsMu sync.Mutex
	procs   []int

	// State below is touched only by the tracer thread.
	pending map[int]pendingCall
	threads map[int]bool
}

// pendingCall is a trapped ioctl waiting for its syscall-exit stop.
type pendingCall struct {
	fd, cmd uint32
	arg     uint64
	region  Memslot // decoded argument of memory-region calls
}

func newTracer(log zerolog.Logger) *Tracer {
	return &Tracer{
		log:     log,
		vm:      newVM(log),
		leader:  make(chan struct{}),
		done:    make(chan struct{}),
		pending: make(map[int]pendingCall),
		threads: make(map[int]bool),
	}
}

// Pid is the pid of the process kvmscope launched (QEMU, or with
// -daemonize QEMU's first process, which exits once the daemon runs).
func (t *Tracer) Pid() int { return t.pid }

// QEMUPid is the QEMU process that runs the guest: the owner of the KVM VM,
// else the oldest live traced process (the launched QEMU, or after
// -daemonize its daemon child), else 0.
func (t *Tracer) QEMUPid() int {
	if pid := t.vm.Pid(); pid != 0 {
		return pid
	}
	t.procsMu.Lock()
	defer t.procsMu.Unlock()
	if len(t.procs) > 0 {
		return t.procs[0]
	}
	return 0
}

// VM is the KVM virtual machine QEMU created (empty until it does).
func (t *Tracer) VM() *VM { return t.vm }

// LeaderExited is closed when the launched process exits.
func (t *Tracer) LeaderExited() <-chan struct{} { return t.leader }

// ExitStatus is the launched process's wait status; valid once
// LeaderExited is closed.
func (t *Tracer) ExitStatus() syscall.WaitStatus { return t.status }

// Done is closed when every traced QEMU task is gone.
func (t *Tracer) Done() <-chan struct{} { return t.done }

// Err reports why the stop loop ended abnormally; valid once Done is closed.
func (t *Tracer) Err() error { return t.err }

// Signal sends sig to QEMU: the process that owns the VM if there is one
// (the daemon under -daemonize), else the launched process.
func (t *Tracer) Signal(sig syscall.Signal) error {
	pid := t.QEMUPid()
	if pid == 0 {
		return unix.ESRCH
	}
	return unix.Kill(pid, sig)
}

// loop handles every stop of every traced task until none is left.
func (t *Tracer) loop() error {
	for {
		var ws unix.WaitStatus
		tid, err := unix.Wait4(-1, &ws, unix.WALL, nil)
		if err == unix.EINTR {
			continue
		}
		if err == unix.ECHILD {
			return nil
		}
		if err != nil {
			return fmt.Errorf("waitpid: %w", err)
		}
		switch {
		case ws.Exited() || ws.Signaled():
			t.exited(tid, ws)
		case ws.Stopped():
			if err := t.stopped(tid, ws); err != nil && !errors.Is(err, unix.ESRCH) {
				// ESRCH: the task died under us (SIGKILL); its exit
				// comes next. Anything else is logged, never fatal:
				// QEMU must keep running.
				t.log.Warn().Err(err).Int("tid", tid).Msg("tracer stop")
			}
		}
	}
}

func (t *Tracer) exited(tid int, ws unix.WaitStatus) {
	delete(t.threads, tid)
	delete(t.pending, tid)
	t.vm.threadExited(tid)
	t.procsMu.Lock()
	for i, p := range t.procs {
		if p == tid {
			t.procs = append(t.procs[:i], t.procs[i+1:]...)
			break
		}
	}
	t.procsMu.Unlock()
	if tid == t.pid {
		t.status = syscall.WaitStatus(ws)
		close(t.leader)
	}
}

func (t *Tracer) stopped(tid int, ws unix.WaitStatus) error {
	t.threads[tid] = true
	sig := ws.StopSignal()
	// The ptrace event is in bits 16-23 of the status. (x/sys/unix's
	// TrapCause reports it only for SIGTRAP stops, but a group-stop under
	// PTRACE_SEIZE is PTRACE_EVENT_STOP with the stopping signal.)
	event := int(ws>>16) & 0xff
	switch {
	case sig == unix.SIGTRAP|0x80:
		return t.syscallExitStop(tid)
	case sig == unix.SIGTRAP && event == unix.PTRACE_EVENT_SECCOMP:
		return t.seccompStop(tid)
	case sig == unix.SIGTRAP && (event == unix.PTRACE_EVENT_FORK || event == unix.PTRACE_EVENT_VFORK):
		if pid, err := getEventMsg(tid); err == nil {
			t.procsMu.Lock()
			t.procs = append(t.procs, int(pid))
			t.procsMu.Unlock()
		}
		return cont(tid, 0)
	case sig == unix.SIGTRAP && event > 0:
		// clone/exec events: the new thread is already traced
		// (PTRACE_O_TRACECLONE) and reports its own stop.
		return cont(tid, 0)
	case event == unix.PTRACE_EVENT_STOP:
		switch sig {
		case unix.SIGSTOP, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU:
			// A group-stop (someone stopped QEMU): honour it.
			return listen(tid)
		}
		// The first stop of a new task, or a PTRACE_INTERRUPT.
		return cont(tid, 0)
	default:
		// Signal-delivery stop. SIGUSR1 is QEMU's vCPU kick: by the time
		// it is delivered KVM_RUN has returned and stored the registers,
		// and the thread is stopped, so this is the moment to copy them.
		if sig == unix.SIGUSR1 {
			t.vm.snapshot(tid)
		}
		return cont(tid, int(sig))
	}
}

func (t *Tracer) seccompStop(tid int) error {
	si, err := getSyscallInfo(tid)
	if err != nil {
		cont(tid, 0)
		return err
	}
	if si.Op != syscallInfoSeccomp || si.NR != unix.SYS_IOCTL {
		return cont(tid, 0)
	}
	pc := pendingCall{fd: uint32(si.Args[0]), cmd: uint32(si.Args[1]), arg: si.Args[2]}
	if pc.cmd == KVMSetUserMemoryRegion || pc.cmd == kvmSetUserMemoryRegion2 {
		b := make([]byte, kvmUserspaceMemoryRegionLen)
		if err := readTask(tid, pc.arg, b); err != nil {
			cont(tid, 0)
			return fmt.Errorf("read %s argument: %w", IoctlName(pc.cmd), err)
		}
		pc.region = parseMemoryRegion(b)
	}
	t.pending[tid] = pc
	// Run the ioctl and stop again at its exit to learn the result.
	return syscallExit(tid)
}

func (t *Tracer) syscallExitStop(tid int) error {
	pc, ok := t.pending[tid]
	delete(t.pending, tid)
	if !ok {
		return cont(tid, 0)
	}
	si, err := getSyscallInfo(tid)
	if err != nil {
		cont(tid, 0)
		return err
	}
	ok = si.Op == syscallInfoExit && !si.Err && si.Rval >= 0
	if !ok {
		t.log.Debug().Str("ioctl", IoctlName(pc.cmd)).Int64("ret", si.Rval).Msg("trapped ioctl failed")
	} else {
		switch pc.cmd {
		case KVMCreateVM:
			t.vm.created(tid, int(si.Rval))
		case KVMCreateVCPU:
			t.vm.vcpuCreated(tid, int(pc.fd), int(pc.arg), int(si.Rval))
		case KVMSetUserMemoryRegion, kvmSetUserMemoryRegion2:
			t.vm.memslotSet(int(pc.fd), pc.region)
		}
	}
	return cont(tid, 0)
}

// ExitCode is the shell-style exit code of a wait status: the exit status,
// or 128+N when killed by signal N.
func ExitCode(ws syscall.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}
