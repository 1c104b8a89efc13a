package session

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/guestmem/gdbstub"
	"github.com/kvmscope/kvmscope/introspect"
)

// GuestAction is one action inside the guest, as its event (kind
// "guest_action") and the API's reply record it: what was done, by
// which task, and the system call's return value.
type GuestAction struct {
	Action string `json:"action"` // "kill"
	PID    int    `json:"pid"`
	Comm   string `json:"comm"`
	Signal int    `json:"signal"`
	// By is the process whose thread made the system call.
	ByPID  int    `json:"by_pid"`
	ByComm string `json:"by_comm"`
	VCPU   int    `json:"vcpu"`
	// Syscall is the system call made, at SyscallRIP (a syscall
	// instruction of By's); Return is what it returned (0, or -errno).
	Syscall    int    `json:"syscall"`
	SyscallRIP string `json:"syscall_rip"`
	Return     int64  `json:"return"`
	// Stops is how many times the guest stopped at kvmscope's
	// breakpoints (most were other tasks, let go at once).
	Stops int `json:"stops"`
	// Skipped is how many chosen threads kvmscope let go because they
	// came back to user mode after no syscall instruction.
	Skipped  int           `json:"skipped,omitempty"`
	Duration time.Duration `json:"duration_ns"`
	// Error is set on the event of an action that failed after the
	// guest ran the call (its effect may have happened).
	Error string `json:"error,omitempty"`
}

// Bounds of an action: how many breakpoint stops it may take, and how
// long a chosen thread has to come back to user mode at the address its
// pt_regs said, before another is chosen.
const (
	maxActionStops = 20000
	returnWait     = 10 * time.Second
	// syscallWait is how long the injected call may take once it runs;
	// it is not cut short by the caller's deadline, since only at its
	// return can the thread's registers be put back.
	syscallWait = 20 * time.Second
)

// Kill kills guest process pid as the guest kernel would for a root
// process that called kill(pid, SIGKILL): one thread of a chosen root
// process is made to make that call at a point where it has just
// returned from a system call of its own, and gets every register back
// after. docs/writable.md ("Actions inside the guest") has the steps,
// what is refused and why. Only with --allow-write, under TCG or KVM.
func (s *Session) Kill(ctx context.Context, pid int) (*GuestAction, error) {
	start := time.Now()
	if _, _, err := s.actionMonitor(); err != nil {
		return nil, err
	}
	var plan *introspect.KillPlan
	var kern *introspect.Kernel
	var exitVA uint64
	var refused error
	_, err := s.scan(ctx, "action", false, func(k *introspect.Kernel, off *introspect.Offsets) error {
		kern = k // this scan's own: the action reads through it after
		procs, err := k.Processes(off, introspect.ProcessOptions{NoCmdline: true})
		if err != nil {
			return err
		}
		// A refusal is an answer, not a failed read: returned as an
		// error here, it would make the scan find the kernel again.
		if exitVA, refused = k.SyscallExitVA(); refused != nil {
			refused = fmt.Errorf("%w: %v", introspect.ErrRefused, refused)
			return nil
		}
		plan, refused = introspect.PlanKill(k, procs, pid)
		return nil
	})
	if err == nil {
		err = refused
	}
	if err != nil {
		return nil, err
	}
	s.actionMu.Lock()
	defer s.actionMu.Unlock()
	if err := s.beginAction(); err != nil {
		return nil, err
	}
	defer s.endAction()
	g, err := s.openStub(ctx)
	if err != nil {
		return nil, err
	}
	a := &GuestAction{Action: "kill", PID: pid, Comm: plan.Target.Comm, Signal: introspect.SIGKILL, Syscall: introspect.SysKill}
	k := &killer{stub: g, kern: kern, plan: plan, exitVA: exitVA, a: a, pgds: map[uint64]bool{}}
	for _, p := range plan.Killers {
		k.pgds[guestmem.KernelCR3(p.PGD)] = true
	}
	err = k.run(ctx)
	if cerr := g.close(); err == nil {
		err = cerr
	}
	a.Duration = time.Since(start)
	if err != nil && !k.injected {
		return nil, err // nothing was done
	}
	if err != nil {
		a.Error = err.Error()
	}
	if ev := s.eventSink(); ev != nil {
		ev.Append("guest_action", a)
	}
	if err != nil {
		return nil, err
	}
	return a, nil
}

// killer runs one kill through the gdbstub, in three stages:
//
//  1. a breakpoint at syscall_exit_to_user_mode: when a killer's thread
//     (its CR3) stops there, its pt_regs (rdi) say where it returns to
//     in user mode;
//  2. a breakpoint there: when the same address space stops there in
//     user mode, the thread is at an instruction boundary right after a
//     syscall instruction (checked: 0f 05 before rip, or at rip when
//     the kernel rewound rip to restart the call). Its registers are
//     saved and it is pointed at that syscall with kill's arguments;
//  3. a breakpoint after that syscall: when it stops there with the same
//     CR3 and stack pointer, rax is kill's return value; every register
//     is put back and the thread goes on where it was.
//
// Other tasks stopping at a breakpoint are stepped past it.
type killer struct {
	*stub
	kern   *introspect.Kernel
	plan   *introspect.KillPlan
	pgds   map[uint64]bool // the killers' page tables, a first filter
	exitVA uint64
	a      *GuestAction

	stage  int
	cr3    uint64 // the chosen killer's page table
	task   uint64 // and its task_struct
	userIP uint64 // stage 2's breakpoint
	ret    uint64 // stage 3's breakpoint, after the syscall
	thread int
	sp     uint64
	regs   saved
	// injected is set once the thread runs the kill: from then on only
	// the kill's return is a point where its registers can be put back.
	injected bool
}

func (k *killer) run(ctx context.Context) error {
	if err := k.insert(ctx, k.exitVA); err != nil {
		return err
	}
	k.stage = 1
	if err := k.Continue(ctx); err != nil {
		return err
	}
	var stageEnd time.Time
	for {
		wctx, cancel := ctx, context.CancelFunc(func() {})
		switch k.stage {
		case 2:
			wctx, cancel = context.WithDeadline(ctx, stageEnd)
		case 3:
			wctx, cancel = context.WithDeadline(context.Background(), stageEnd)
		}
		st, err := k.Wait(wctx)
		cancel()
		if err != nil {
			if k.stage == 2 && errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				// The thread went elsewhere (a signal handler): choose
				// again, at the next system call.
				if err := k.back(ctx); err != nil {
					return err
				}
				continue
			}
			switch {
			case k.stage == 1 && k.a.Stops == 0 && k.kvm && errors.Is(err, context.DeadlineExceeded):
				// Not one task of the guest returned from a system call
				// through the breakpoint: either the guest made none,
				// or its vCPUs do not stop at hardware breakpoints.
				err = fmt.Errorf("no vCPU stopped at the hardware breakpoint at syscall_exit_to_user_mode (%#x) before the deadline (nothing was changed): the guest made no system call, or this KVM does not stop its vCPUs at guest-debug breakpoints (KVM nested under QEMU's TCG does not: docs/limitations.md): %w", k.exitVA, err)
			case k.stage == 1 && errors.Is(err, context.DeadlineExceeded):
				err = fmt.Errorf("none of the %d processes kvmscope may act through made a system call in time (nothing was changed; %d other stops): %w", len(k.plan.Killers), k.a.Stops, err)
			}
			return k.failed(err)
		}
		rip, err := k.reg(ctx, st.Thread, "rip")
		if err != nil {
			return k.failed(err)
		}
		if !k.bps[rip] {
			// A step past a breakpoint ended (or the guest stopped for
			// another reason): go on.
			if err := k.Continue(ctx); err != nil {
				return k.failed(err)
			}
			continue
		}
		if k.a.Stops++; k.a.Stops > maxActionStops {
			return k.failed(fmt.Errorf("no thread of a process that may kill stopped where kvmscope could act in %d stops", maxActionStops))
		}
		done, next, err := k.stop(ctx, st.Thread, rip)
		if err != nil {
			return k.failed(err)
		}
		if done {
			return nil
		}
		if next {
			stageEnd = time.Now().Add(returnWait)
			if k.stage == 3 {
				stageEnd = time.Now().Add(syscallWait)
			}
			if err = k.Continue(ctx); err == nil && k.stage == 3 {
				k.injected = true
			}
		} else {
			err = k.stepPast(ctx, st.Thread, rip)
		}
		if err != nil {
			return k.failed(err)
		}
	}
}

// stop handles thread stopped at the breakpoint rip: done when the kill
// has returned and everything is put back, next when the stage moved on
// (the guest continues), else the thread is not the one sought and is
// stepped past the breakpoint.
func (k *killer) stop(ctx context.Context, thread int, rip uint64) (done, next bool, err error) {
	cr3, err := k.reg(ctx, thread, "cr3")
	if err != nil {
		return false, false, err
	}
	// CR3 without PCID and flag bits, and the kernel half of a KPTI pair
	// (user mode runs on the page after mm->pgd). Without KPTI two page
	// tables may differ in bit 12 only: the task check tells them apart.
	cr3 = guestmem.KernelCR3(cr3)
	switch k.stage {
	case 1:
		if !k.pgds[cr3] || rip != k.exitVA {
			return false, false, nil
		}
		// The CR3 of a process kvmscope chose may have been freed and
		// reused since its scan: the task is the proof.
		task, err := k.current(ctx, thread, "gs_base")
		if err != nil {
			return false, false, err
		}
		p, ok := k.plan.Killers[task]
		if !ok || guestmem.KernelCR3(p.PGD) != cr3 {
			return false, false, nil
		}
		regs, err := k.reg(ctx, thread, "rdi")
		if err != nil {
			return false, false, err
		}
		b, err := k.ReadMemory(ctx, thread, regs+introspect.PtRegsIP, introspect.PtRegsSP+8-introspect.PtRegsIP)
		if err != nil {
			return false, false, nil // not a pt_regs we can read: not this one
		}
		ip, cs := gdbstub.U64(b[0:]), gdbstub.U64(b[introspect.PtRegsCS-introspect.PtRegsIP:])
		if cs&3 != 3 || ip >= 1<<47 || ip < 2 {
			return false, false, nil // not returning to user mode
		}
		if err := k.remove(ctx, k.exitVA); err != nil {
			return false, false, err
		}
		if err := k.insert(ctx, ip); err != nil {
			return false, false, err
		}
		k.stage, k.cr3, k.task, k.userIP = 2, cr3, task, ip
		k.a.ByPID, k.a.ByComm = p.PID, p.Comm
		return false, true, nil
	case 2:
		cs, err := k.reg(ctx, thread, "cs")
		if err != nil {
			return false, false, err
		}
		if cr3 != k.cr3 || rip != k.userIP || cs&3 != 3 {
			return false, false, nil
		}
		// Another thread of the process (same CR3) may be the one here:
		// it is the chosen task that was checked.
		if task, err := k.current(ctx, thread, "k_gs_base"); err != nil || task != k.task {
			return false, false, err
		}
		// A page the task has not faulted in yet cannot be read (the
		// entry point of a program it has just executed): no syscall
		// to borrow there either.
		code, err := k.ReadMemory(ctx, thread, rip-2, 4)
		if err != nil {
			code = make([]byte, 4)
		}
		var at uint64
		switch {
		case code[0] == 0x0f && code[1] == 0x05:
			at = rip - 2
		case code[2] == 0x0f && code[3] == 0x05:
			// The kernel rewound rip onto the syscall to restart it
			// (-ERESTART*): the same instruction serves.
			at = rip
		default:
			// Not back from a system call (execve returns to the new
			// program's entry point), or its code could not be read: no
			// syscall instruction to borrow,
			// so not a point to act at. Nothing was changed; choose
			// again at the next system call.
			k.a.Skipped++
			if err := k.remove(ctx, k.userIP); err != nil {
				return false, false, err
			}
			if err := k.insert(ctx, k.exitVA); err != nil {
				return false, false, err
			}
			k.stage = 1
			return false, true, nil
		}
		if k.regs, err = k.save(ctx, thread); err != nil {
			return false, false, err
		}
		k.thread, k.sp = thread, gdbstub.U64(k.regs["rsp"])
		if err := k.remove(ctx, k.userIP); err != nil {
			return false, false, err
		}
		if err := k.insert(ctx, at+2); err != nil {
			return false, false, err
		}
		k.ret, k.a.VCPU, k.a.SyscallRIP = at+2, thread-1, fmt.Sprintf("%#x", at)
		for _, w := range []struct {
			reg string
			v   uint64
		}{{"rax", introspect.SysKill}, {"rdi", uint64(k.plan.Target.PID)}, {"rsi", introspect.SIGKILL}, {"rip", at}} {
			if err := k.setReg(ctx, thread, w.reg, w.v); err != nil {
				return false, false, err // failed() puts back what was written
			}
		}
		k.stage = 3
		return false, true, nil
	case 3:
		sp, err := k.reg(ctx, thread, "rsp")
		if err != nil {
			return false, false, err
		}
		if cr3 != k.cr3 || rip != k.ret || sp != k.sp {
			return false, false, nil
		}
		if task, err := k.current(ctx, thread, "k_gs_base"); err != nil || task != k.task {
			return false, false, err
		}
		rax, err := k.reg(ctx, thread, "rax")
		if err != nil {
			return false, false, err
		}
		k.a.Return = int64(rax)
		if err := k.restore(ctx, thread, k.regs); err != nil {
			return false, false, fmt.Errorf("put back the registers of pid %d after the kill: %w", k.a.ByPID, err)
		}
		k.stage = 4
		return true, false, k.remove(ctx, k.ret)
	}
	return false, false, nil
}

// current is the task running on thread's vCPU, through the per-CPU
// base in register base: gs_base in kernel mode; in user mode the
// kernel's is in KERNEL_GS_BASE (swapgs exchanges them at entry and
// exit).
func (k *killer) current(ctx context.Context, thread int, base string) (uint64, error) {
	gs, err := k.reg(ctx, thread, base)
	if err != nil {
		return 0, err
	}
	task, err := k.kern.CurrentTask(gs)
	if err != nil {
		return 0, fmt.Errorf("the task on vCPU %d: %w", thread-1, err)
	}
	return task, nil
}

// back gives up on the thread chosen in stage 2 (nothing of it was
// changed yet) and waits for the next killer's system call.
func (k *killer) back(ctx context.Context) error {
	if err := k.remove(ctx, k.userIP); err != nil {
		return err
	}
	if err := k.insert(ctx, k.exitVA); err != nil {
		return err
	}
	k.stage = 1
	return k.Continue(ctx)
}

// failed is err, with the thread's registers put back when the kill was
// set up but had not run yet. Once it runs, only its return is a point
// where they can be (stage 3 waits for it past the caller's deadline).
func (k *killer) failed(err error) error {
	if k.stage != 3 || k.regs == nil {
		return err
	}
	if !k.injected {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if rerr := k.restore(ctx, k.thread, k.regs); rerr == nil {
			return err
		}
	}
	return fmt.Errorf("%w; the kill of pid %d may have run from pid %d, whose registers kvmscope could not put back", err, k.a.PID, k.a.ByPID)
}
