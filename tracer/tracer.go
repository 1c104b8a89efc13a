//go:build linux && amd64

package tracer

import (
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"github.com/kvmscope/kvmscope/tracer/policy"
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

	handlers []handler
	enforcer *enforcer // nil without a policy

	killMu sync.Mutex
	killed string // why the policy killed QEMU ("" if it did not)

	// State below is touched only by the tracer thread.
	pending map[int]*pendingCall
	threads map[int]bool
	tgids   map[int]int // thread -> its process
	frozen  int         // the thread whose call froze its process, or 0
	// waitFor is the loop's waitpid argument: -1 (every child and
	// tracee), or an attached QEMU's -pgid (waitQEMUOnly); ownChildren
	// says it is the latter (OwnChildren).
	waitFor     int
	ownChildren atomic.Bool
	held        []heldStop // stops of frozen threads, handled after the call
	freezes     uint64
	stops       map[uint32]uint64 // trapped ioctls by request (Stops)
	stopsMu     sync.Mutex

	inj    injections // system calls to run as QEMU (inject.go)
	guard  guard      // pages the guest may not write (guard.go)
	events Events     // nil: events go to the log
}

// pendingCall is a trapped ioctl waiting for its syscall-exit stop.
type pendingCall struct {
	c      *call
	follow []handler // the handlers that asked for the result
}

// Options are what a tracer enforces and where it reports.
type Options struct {
	// Policy decides every ioctl the seccomp filter traps for it (nil:
	// none; the filter then traps only the tracer's bookkeeping). The
	// filter the traced process installs must come from the same policy
	// (Filter).
	Policy *policy.Policy
	// Events receives the policy's decisions other than plain allows,
	// and failed calls on foreign ABIs (nil: they go to the log).
	Events Events
	// Learn, when set, records every trapped call (policy learn).
	Learn *policy.Learner
	// Learned, with Learn, is called each time Learn sees a new request
	// or value, while QEMU's call waits (to save the learned policy).
	Learned func(*policy.Learner)
	// Blocked is called, on the tracer thread while QEMU waits, for each
	// store the guard skipped (Protect): it must return at once.
	Blocked func(BlockedWrite)
}

func newTracer(log zerolog.Logger, o Options) *Tracer {
	t := &Tracer{
		log:     log,
		vm:      newVM(log),
		leader:  make(chan struct{}),
		done:    make(chan struct{}),
		pending: make(map[int]*pendingCall),
		threads: make(map[int]bool),
		tgids:   make(map[int]int),
		stops:   make(map[uint32]uint64),
		waitFor: -1,
	}
	t.vm.injectFunc = t.injectFunc
	t.vm.guarded = t.guard.overlaps
	t.vm.writeGuarded = t.writeGuarded
	t.events = o.Events
	t.guard.report = o.Blocked
	if o.Policy != nil {
		t.enforcer = &enforcer{p: o.Policy, learn: o.Learn, learned: o.Learned}
		t.handlers = append(t.handlers, t.enforcer)
	}
	t.handlers = append(t.handlers, vmCapture{t.vm}, memslots{t.vm}, msrCapture{t.vm})
	return t
}

// Stops counts the ioctls that stopped in the tracer, by request: what
// the seccomp filter sent here (each costs a ptrace round trip).
func (t *Tracer) Stops() map[uint32]uint64 {
	t.stopsMu.Lock()
	defer t.stopsMu.Unlock()
	return maps.Clone(t.stops)
}

// Killed says why the policy killed QEMU, or "" if it did not.
func (t *Tracer) Killed() string {
	t.killMu.Lock()
	defer t.killMu.Unlock()
	return t.killed
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
		var tid int
		var err error
		if t.frozen == 0 && len(t.held) > 0 {
			// A call that froze QEMU is over: handle what the frozen
			// threads reported meanwhile, in order.
			h := t.held[0]
			t.held = t.held[1:]
			tid, ws = h.tid, h.ws
		} else {
			tid, err = unix.Wait4(t.waitFor, &ws, unix.WALL, nil)
		}
		if err == unix.EINTR {
			continue
		}
		if err == unix.ECHILD && t.waitFor != -1 && len(t.threads) > 0 {
			// Threads are traced but none is in QEMU's process group
			// any more: it moved (setpgid). Wait for everything, as
			// run does; the children of this process lose their
			// exit statuses to the loop from now on.
			t.log.Warn().Int("pgid", -t.waitFor).Msg("QEMU left its process group; the tracer now waits for every child")
			t.waitFor = -1
			t.ownChildren.Store(false)
			continue
		}
		if err == unix.ECHILD {
			return nil
		}
		if err != nil {
			return fmt.Errorf("waitpid: %w", err)
		}
		if t.vm.detached.Load() {
			// Detach: end the loop and, with it, this thread, whose
			// exit detaches every tracee (attach_running.go).
			return nil
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
	delete(t.tgids, tid)
	t.thaw(tid)
	for i, h := range t.held {
		if h.tid == tid {
			t.held = append(t.held[:i], t.held[i+1:]...)
			break
		}
	}
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
	if !t.threads[tid] {
		t.threads[tid] = true
		t.tgids[tid] = tgidOf(tid)
	}
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
		return t.resume(tid, 0)
	case sig == unix.SIGTRAP && event == unix.PTRACE_EVENT_EXEC:
		// After execve the thread-group id is the leader's.
		t.tgids[tid] = tgidOf(tid)
		return t.resume(tid, 0)
	case sig == unix.SIGTRAP && event > 0:
		// clone events: the new thread is already traced
		// (PTRACE_O_TRACECLONE) and reports its own stop.
		return t.resume(tid, 0)
	case event == unix.PTRACE_EVENT_STOP:
		switch sig {
		case unix.SIGSTOP, unix.SIGTSTP, unix.SIGTTIN, unix.SIGTTOU:
			// A group-stop (someone stopped QEMU): honour it.
			return listen(tid)
		}
		// The first stop of a new task, or a PTRACE_INTERRUPT.
		return t.resume(tid, 0)
	default:
		// Signal-delivery stop. SIGUSR1 is QEMU's vCPU kick: by the time
		// it is delivered KVM_RUN has returned and stored the registers,
		// and the thread is stopped, so this is the moment to copy them.
		if sig == unix.SIGUSR1 {
			t.vm.snapshot(tid)
			if t.pending[tid] == nil && t.frozen == 0 {
				// Calls to run as QEMU on this thread (inject.go);
				// it then resumes from the last one's exit stop, and
				// the signal is delivered as it would have been.
				if l := t.inj.take(tid); len(l) > 0 {
					t.runInjections(tid, l)
				}
			}
		}
		if sig == unix.SIGSEGV && t.guardFault(tid) {
			// A store into a guarded page, skipped (guardfault.go).
			return t.resume(tid, 0)
		}
		return t.resume(tid, int(sig))
	}
}

// resume lets tid go on, delivering sig; a thread in the middle of a
// followed call keeps stopping at system-call boundaries until its exit
// stop.
func (t *Tracer) resume(tid, sig int) error {
	if t.pending[tid] != nil {
		return ptrace(unix.PTRACE_SYSCALL, tid, 0, uintptr(sig))
	}
	return cont(tid, sig)
}

func (t *Tracer) seccompStop(tid int) error {
	si, err := getSyscallInfo(tid)
	if err != nil {
		// Without the call's number the tracer cannot decide: fail it.
		failSyscall(tid, unix.EPERM)
		cont(tid, 0)
		return err
	}
	if si.Op != syscallInfoSeccomp {
		return t.resume(tid, 0)
	}
	if si.Arch != auditArchX8664 || si.NR&x32SyscallBit != 0 {
		return t.foreignABI(tid, si)
	}
	if si.NR != unix.SYS_IOCTL {
		return cont(tid, 0)
	}
	c := &call{t: t, tid: tid, pid: t.tgids[tid], fd: int(int32(si.Args[0])), cmd: uint32(si.Args[1]), arg: si.Args[2]}
	c.req, _ = ioctl.ByCmd(c.cmd)
	t.stopsMu.Lock()
	t.stops[c.cmd]++
	t.stopsMu.Unlock()
	pc := &pendingCall{c: c}
	skip := false
	for _, h := range t.handlers {
		v := t.enter(h, c)
		switch {
		case v.kill != "":
			return t.kill(c, v.kill)
		case v.deny:
			t.thaw(tid)
			if err := failSyscall(tid, v.errno); err != nil {
				// Cannot fail it: do not let it run either.
				return t.kill(c, "could not deny "+c.name()+": "+err.Error())
			}
			return cont(tid, 0)
		case v.exit:
			pc.follow = append(pc.follow, h)
		}
		skip = skip || v.skip
	}
	if skip {
		// A handler runs the call itself at the exit stop (the guard's
		// replay of a memslot call).
		c.skipped = true
		if err := failSyscall(tid, 0); err != nil {
			return t.kill(c, "could not skip "+c.name()+": "+err.Error())
		}
	}
	if len(pc.follow) == 0 && t.frozen != tid {
		return cont(tid, 0)
	}
	// Run the ioctl and stop again at its exit, to learn the result and,
	// if the call froze QEMU, to let the other threads go.
	t.pending[tid] = pc
	return syscallExit(tid)
}

// enter runs one handler; a handler that panics denies the call.
func (t *Tracer) enter(h handler, c *call) (v verdict) {
	defer func() {
		if r := recover(); r != nil {
			t.log.Error().Interface("panic", r).Str("ioctl", c.name()).Msg("ioctl handler failed; denying the call")
			v = verdict{deny: true, errno: unix.EPERM}
		}
	}()
	return h.enter(c)
}

// kill ends QEMU for the policy. The calling thread stays in its seccomp
// stop, so the call never runs; SIGKILL takes the whole process.
func (t *Tracer) kill(c *call, why string) error {
	t.killMu.Lock()
	if t.killed == "" {
		t.killed = why
	}
	t.killMu.Unlock()
	t.log.Error().Str("reason", why).Int("pid", c.pid).Msg("the ioctl policy kills QEMU")
	t.thaw(c.tid)
	return unix.Kill(c.pid, unix.SIGKILL)
}

// foreignABI fails a system call made through the i386 (int 0x80) or x32
// ABI with ENOSYS, as a kernel without those ABIs would, and reports it:
// QEMU never makes one, and a compromised QEMU would use it to get past
// a filter written for x86-64 numbers.
func (t *Tracer) foreignABI(tid int, si syscallInfo) error {
	abi := "i386"
	if si.Arch == auditArchX8664 {
		abi = "x32"
	}
	ev := ABIEvent{ABI: abi, NR: si.NR, PID: t.tgids[tid], TID: tid}
	t.emit("abi", ev)
	if err := failSyscall(tid, unix.ENOSYS); err != nil {
		unix.Kill(t.tgids[tid], unix.SIGKILL)
		return err
	}
	return cont(tid, 0)
}

func (t *Tracer) syscallExitStop(tid int) error {
	pc := t.pending[tid]
	if pc == nil {
		return cont(tid, 0)
	}
	si, err := getSyscallInfo(tid)
	if err != nil {
		delete(t.pending, tid)
		t.thaw(tid)
		cont(tid, 0)
		return err
	}
	if si.Op != syscallInfoExit {
		// An entry stop: the call was interrupted by a signal and is
		// being restarted. Wait for its exit.
		return syscallExit(tid)
	}
	delete(t.pending, tid)
	failed := si.Err || si.Rval < 0
	if failed {
		t.log.Debug().Str("ioctl", pc.c.name()).Int64("ret", si.Rval).Msg("trapped ioctl failed")
	}
	// The handlers run before the thaw: what they read of the result
	// (KVM_GET_MSRS's values) is what the kernel wrote, and a read would
	// otherwise freeze QEMU again with no exit stop to end it.
	for _, h := range pc.follow {
		h.exit(pc.c, si.Rval, failed)
	}
	t.thaw(tid)
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
