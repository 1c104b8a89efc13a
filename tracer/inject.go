//go:build linux && amd64

package tracer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// System-call injection: kvmscope makes a stopped QEMU thread execute one
// system call of kvmscope's choosing, then puts the thread back exactly as
// it was. KVM refuses VM and vCPU ioctls from any process but the one that
// created the VM (kvm->mm must be current->mm), so this is how kvmscope
// issues KVM ioctls as QEMU: KVM_GET_MSRS for LSTAR, and later
// from C; this is the part of it kvmscope needs.
//
// How, on the tracer thread, at a signal-delivery stop of the thread:
//  1. save its registers (PTRACE_GETREGS);
//  2. point rip at a `syscall` instruction already in QEMU's memory (the
//     one the thread just returned from, rip-2, or one in the vDSO), put
//     the call in rax and the argument registers, and set orig_rax to -1
//     so the kernel does not apply its restart logic for the interrupted
//     call to ours;
//  3. copy the call's buffer, if any, below the red zone of the thread's
//     stack, and resume with PTRACE_SYSCALL, suppressing the signal;
//  4. step through the call's entry (and seccomp) stops to its exit stop:
//     the filter's verdict does not apply to our call, and no handler sees
//     it;
//  5. read the result and the buffer back, restore the stack bytes and
//     the registers, and deliver the suppressed signal again.
//
// The thread runs only the one instruction: from the exit stop it resumes
// with its own registers, its interrupted call's result and restart state
// intact (the signal it then gets is the one it was about to get).

// Syscall is one system call to run as QEMU.
type Syscall struct {
	NR   uintptr
	Args [6]uint64
	// Buf, when not nil, is copied to the thread's stack before the call,
	// and argument BufArg is set to its address; after the call Buf holds
	// what the kernel left there. At most 4 KiB.
	Buf    []byte
	BufArg int
}

// maxInjectBuf bounds Buf: it lives below the thread's stack pointer.
const maxInjectBuf = 4096

// redZone is the x86-64 ABI's red zone below rsp, which leaf functions
// use without moving rsp: the buffer goes below it.
const redZone = 128

// injection is work to do on a thread at its next signal-delivery stop:
// fn runs on the tracer thread and makes the thread execute system calls
// through run. With freeze, every other thread of the process is stopped
// (freeze.go) while fn runs: no vCPU is in KVM_RUN, so fn can change the
// VM's memslots without a vCPU seeing them half-changed.
type injection struct {
	fn     func(run runFunc) error
	freeze bool
	err    error
	done   chan struct{}
}

// runFunc runs one system call on the injection's thread and returns its
// result; a negative result is returned as an unix.Errno.
type runFunc func(Syscall) (int64, error)

// injections are the calls waiting for their thread's next stop.
type injections struct {
	mu    sync.Mutex
	byTID map[int][]*injection
}

func (q *injections) add(tid int, in *injection) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.byTID == nil {
		q.byTID = map[int][]*injection{}
	}
	q.byTID[tid] = append(q.byTID[tid], in)
}

func (q *injections) take(tid int) []*injection {
	q.mu.Lock()
	defer q.mu.Unlock()
	l := q.byTID[tid]
	delete(q.byTID, tid)
	return l
}

// remove drops in if it has not been taken yet.
func (q *injections) remove(tid int, in *injection) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	l := q.byTID[tid]
	for i, x := range l {
		if x == in {
			q.byTID[tid] = append(l[:i], l[i+1:]...)
			return true
		}
	}
	return false
}

// ErrInjectTimeout is returned when the thread did not stop in time (QEMU
// is stopped, or the thread blocks signals).
var ErrInjectTimeout = errors.New("the QEMU thread did not stop for the system call")

// InjectVCPU runs sc on the thread of vCPU id, as QEMU: the thread is
// kicked out of KVM_RUN with SIGUSR1 (QEMU's own kick) and runs sc at the
// signal's delivery stop, where the vCPU is not in KVM_RUN, so a vCPU
// ioctl does not wait for the vCPU's mutex. It returns the call's result;
// a negative result is returned as an unix.Errno.
func (t *Tracer) InjectVCPU(ctx context.Context, id int, sc Syscall) (int64, error) {
	c, pid, err := t.vm.vcpu(id)
	if err != nil {
		return 0, err
	}
	return t.inject(ctx, pid, c.TID, sc)
}

func (t *Tracer) inject(ctx context.Context, pid, tid int, sc Syscall) (int64, error) {
	if err := sc.check(); err != nil {
		return 0, err
	}
	var ret int64
	err := t.injectFunc(ctx, pid, tid, false, func(run runFunc) error {
		var err error
		ret, err = run(sc)
		return err
	})
	return ret, err
}

func (sc Syscall) check() error {
	if len(sc.Buf) > maxInjectBuf {
		return fmt.Errorf("inject: buffer of %d bytes, at most %d", len(sc.Buf), maxInjectBuf)
	}
	if sc.Buf != nil && (sc.BufArg < 0 || sc.BufArg > 5) {
		return fmt.Errorf("inject: buffer argument %d", sc.BufArg)
	}
	return nil
}

// injectFunc runs fn on the tracer thread while thread tid of pid is in a
// signal-delivery stop (and, with freeze, every other thread of pid is
// stopped too); fn makes tid execute system calls through run.
func (t *Tracer) injectFunc(ctx context.Context, pid, tid int, freeze bool, fn func(run runFunc) error) error {
	in := &injection{fn: fn, freeze: freeze, done: make(chan struct{})}
	t.inj.add(tid, in)
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	// Kick until the thread stops: one SIGUSR1 is enough unless another
	// stop consumed it first.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if err := unix.Tgkill(pid, tid, unix.SIGUSR1); err != nil {
			t.inj.remove(tid, in)
			return fmt.Errorf("kick thread %d: %w", tid, err)
		}
		select {
		case <-in.done:
			return in.err
		case <-tick.C:
		case <-ctx.Done():
			if t.inj.remove(tid, in) {
				return fmt.Errorf("thread %d: %w", tid, ErrInjectTimeout)
			}
			<-in.done // taken: it is running now
			return in.err
		}
	}
}

// runOn returns the runFunc that injects calls into tid, which the tracer
// thread holds in a stop.
func (t *Tracer) runOn(tid int) runFunc {
	return func(sc Syscall) (int64, error) {
		if err := sc.check(); err != nil {
			return 0, err
		}
		ret, err := t.injectNow(tid, sc)
		if err == nil && ret < 0 && ret > -4096 {
			return ret, unix.Errno(-ret)
		}
		return ret, err
	}
}

// runInjections runs the work queued for tid, which is in its
// signal-delivery stop; it leaves tid stopped (at the last call's exit
// stop), and the caller resumes it with the signal.
func (t *Tracer) runInjections(tid int, l []*injection) {
	for _, in := range l {
		if in.freeze {
			if err := t.freeze(tid, t.tgids[tid]); err != nil {
				t.thaw(tid)
				in.err = err
				close(in.done)
				continue
			}
		}
		in.err = t.injectRecover(in.fn, t.runOn(tid))
		if in.freeze {
			t.thaw(tid)
		}
		close(in.done)
	}
}

// injectRecover runs fn; a panic in it is an error, never the end of the
// tracer (QEMU must keep running).
func (t *Tracer) injectRecover(fn func(runFunc) error, run runFunc) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("inject: %v", r)
		}
	}()
	return fn(run)
}

func (t *Tracer) injectNow(tid int, sc Syscall) (int64, error) {
	pid := t.tgids[tid]
	var saved unix.PtraceRegs
	if err := unix.PtraceGetRegs(tid, &saved); err != nil {
		return 0, fmt.Errorf("inject: PTRACE_GETREGS(%d): %w", tid, err)
	}
	insn, err := syscallInsn(pid, saved.Rip)
	if err != nil {
		return 0, err
	}
	regs := saved
	regs.Rip, regs.Rax, regs.Orig_rax = insn, uint64(sc.NR), ^uint64(0)
	args := sc.Args
	var bufAddr uint64
	var stackSaved []byte
	if sc.Buf != nil {
		bufAddr = (saved.Rsp - redZone - uint64(len(sc.Buf))) &^ 15
		stackSaved = make([]byte, len(sc.Buf))
		if err := readTask(pid, bufAddr, stackSaved); err != nil {
			return 0, fmt.Errorf("inject: thread %d's stack: %w", tid, err)
		}
		if err := writeTask(pid, bufAddr, sc.Buf); err != nil {
			return 0, fmt.Errorf("inject: thread %d's stack: %w", tid, err)
		}
		args[sc.BufArg] = bufAddr
	}
	regs.Rdi, regs.Rsi, regs.Rdx, regs.R10, regs.R8, regs.R9 = args[0], args[1], args[2], args[3], args[4], args[5]
	restore := func() error {
		if stackSaved != nil {
			if err := readTask(pid, bufAddr, sc.Buf); err != nil {
				return fmt.Errorf("inject: read the result: %w", err)
			}
			writeTask(pid, bufAddr, stackSaved)
		}
		if err := unix.PtraceSetRegs(tid, &saved); err != nil {
			return fmt.Errorf("inject: restore thread %d's registers: %w", tid, err)
		}
		return nil
	}
	if err := unix.PtraceSetRegs(tid, &regs); err != nil {
		return 0, fmt.Errorf("inject: PTRACE_SETREGS(%d): %w", tid, err)
	}
	ret, deferred, err := t.stepSyscall(tid)
	if rerr := restore(); err == nil {
		err = rerr
	}
	// Signals that arrived before the call ran were held back (delivered
	// at once, they would stop the thread again before the call); they
	// are sent again now, in the thread's own state.
	for _, sig := range deferred {
		unix.Tgkill(pid, tid, unix.Signal(sig))
	}
	return ret, err
}

// stepSyscall resumes tid into the system call its registers hold and
// follows it to its exit stop, returning its result and the signals that
// arrived meanwhile (not delivered).
func (t *Tracer) stepSyscall(tid int) (ret int64, deferred []int, err error) {
	if err := ptrace(unix.PTRACE_SYSCALL, tid, 0, 0); err != nil {
		return 0, nil, fmt.Errorf("inject: PTRACE_SYSCALL(%d): %w", tid, err)
	}
	for {
		var ws unix.WaitStatus
		if _, err := unix.Wait4(tid, &ws, unix.WALL, nil); err != nil {
			if err == unix.EINTR {
				continue
			}
			return 0, deferred, fmt.Errorf("inject: wait for %d: %w", tid, err)
		}
		if ws.Exited() || ws.Signaled() {
			t.exited(tid, ws)
			return 0, deferred, fmt.Errorf("inject: thread %d exited", tid)
		}
		sig := ws.StopSignal()
		event := int(ws>>16) & 0xff
		if sig == unix.SIGTRAP|0x80 || (sig == unix.SIGTRAP && event == unix.PTRACE_EVENT_SECCOMP) {
			si, err := getSyscallInfo(tid)
			if err != nil {
				return 0, deferred, err
			}
			if si.Op == syscallInfoExit {
				return si.Rval, deferred, nil
			}
			if err := ptrace(unix.PTRACE_SYSCALL, tid, 0, 0); err != nil {
				return 0, deferred, fmt.Errorf("inject: PTRACE_SYSCALL(%d): %w", tid, err)
			}
			continue
		}
		// Any other stop before the call ran (a signal, an interrupt):
		// hold the signal back for later, and go on.
		if event == 0 && !slices.Contains(deferred, int(sig)) {
			deferred = append(deferred, int(sig))
		}
		if err := ptrace(unix.PTRACE_SYSCALL, tid, 0, 0); err != nil {
			return 0, deferred, fmt.Errorf("inject: PTRACE_SYSCALL(%d): %w", tid, err)
		}
	}
}

// syscallInsn finds a `syscall` instruction (0f 05) to execute in pid: the
// one before rip when the thread just returned from a system call (a vCPU
// kicked out of KVM_RUN), else one in the vDSO. Only the two bytes are
// executed; what follows them is never reached.
func syscallInsn(pid int, rip uint64) (uint64, error) {
	var b [2]byte
	if rip >= 2 && readTask(pid, rip-2, b[:]) == nil && b == [2]byte{0x0f, 0x05} {
		return rip - 2, nil
	}
	maps, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/maps")
	if err != nil {
		return 0, fmt.Errorf("inject: %w", err)
	}
	for _, l := range strings.Split(string(maps), "\n") {
		if !strings.HasSuffix(l, "[vdso]") {
			continue
		}
		var lo, hi uint64
		if _, err := fmt.Sscanf(l, "%x-%x", &lo, &hi); err != nil || hi <= lo || hi-lo > 1<<20 {
			break
		}
		vdso := make([]byte, hi-lo)
		if err := readTask(pid, lo, vdso); err != nil {
			return 0, fmt.Errorf("inject: read the vDSO: %w", err)
		}
		if i := bytes.Index(vdso, []byte{0x0f, 0x05}); i >= 0 {
			return lo + uint64(i), nil
		}
	}
	return 0, fmt.Errorf("inject: no syscall instruction found in process %d", pid)
}
