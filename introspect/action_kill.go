package introspect

import (
	"errors"
	"fmt"
)

// The x86-64 struct pt_regs (arch/x86/include/uapi/asm/ptrace.h): the
// user registers the entry code saves on the kernel stack. Its layout is
// user ABI (PTRACE_GETREGS copies it), so it is the same in every kernel.
const (
	PtRegsIP    = 16 * 8
	PtRegsCS    = 17 * 8
	PtRegsFlags = 18 * 8
	PtRegsSP    = 19 * 8
	PtRegsSize  = 21 * 8
)

// x86-64 system call and signal numbers (arch/x86/entry/syscalls/
// syscall_64.tbl, include/uapi/asm-generic/signal.h): ABI too.
const (
	SysKill = 62
	SIGKILL = 9
)

// SyscallExit is the kernel function every x86-64 system call returns to
// user mode through, called with the task's pt_regs (its first argument,
// rdi): syscall_exit_to_user_mode(struct pt_regs *regs), kernel/entry/
// common.c, on x86 since Linux 5.9 (the generic entry code). It is
// noinstr, never inlined into do_syscall_64, so kallsyms has it.
const SyscallExit = "syscall_exit_to_user_mode"

// SyscallExitVA is the address of SyscallExit, or why kvmscope cannot
// act on this kernel.
func (k *Kernel) SyscallExitVA() (uint64, error) {
	va, ok := k.Symbol(SyscallExit)
	if !ok {
		return 0, fmt.Errorf("the guest kernel has no %s (x86-64 Linux 5.9 or later has it): kvmscope cannot find a safe point to act at", SyscallExit)
	}
	return va, nil
}

// KillPlan is what a kill inside the guest will do: the process to kill
// and the tasks that may make the kill(2) call (thread-group leaders, by
// task_struct address).
type KillPlan struct {
	Target  Process
	Killers map[uint64]Process
}

// ErrRefused is an action kvmscope will not do: the guest kernel could
// not survive it, or kvmscope cannot know it would.
var ErrRefused = errors.New("refused")

func refuse(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrRefused}, args...)...)
}

// PlanKill checks that killing pid is something the guest kernel does
// for any root process (kill(pid, SIGKILL)), and picks the processes
// that may ask it to. procs is a process scan (thread-group leaders).
//
// The target must be a user process other than init: SIGKILL of pid 1 is
// ignored by the kernel unless init is dying, and init's death panics
// Linux; kernel threads ignore signals. A killer must be a user process
// whose real and effective uid are 0 (kill_ok_by_cred), not init (a
// fault while its registers are borrowed would be the kernel's panic),
// not confined by seccomp (task_struct.seccomp.mode 0: a filter could
// refuse or kill on kill(2)), and in the initial pid namespace
// (thread_pid->level 0), where the pid kvmscope reads is the one kill(2)
// takes. The last two need the kernel's BTF.
func PlanKill(k *Kernel, procs []Process, pid int) (*KillPlan, error) {
	if pid == 1 {
		return nil, refuse("pid 1 is init: the kernel does not deliver SIGKILL to it, and Linux panics when init dies")
	}
	if pid <= 0 {
		return nil, refuse("pid %d is not a process", pid)
	}
	var target *Process
	for i := range procs {
		if procs[i].PID == pid {
			target = &procs[i]
		}
	}
	switch {
	case target == nil:
		return nil, refuse("no process with pid %d in the guest's task list", pid)
	case target.KThread || target.PGD == 0:
		return nil, refuse("pid %d (%s) is a kernel thread: kernel threads ignore signals", pid, target.Comm)
	case target.State == "Z":
		return nil, refuse("pid %d (%s) has exited already: its parent has not reaped it yet", pid, target.Comm)
	}
	if k.BTF == nil {
		return nil, refuse("the guest kernel has no BTF: kvmscope cannot tell which processes seccomp confines or which pid namespace they are in, so it has no process to act through")
	}
	seccomp, err := k.MemberOffset("task_struct", "seccomp.mode")
	if err != nil {
		return nil, refuse("task_struct.seccomp.mode: %v", err)
	}
	threadPid, err := k.MemberOffset("task_struct", "thread_pid")
	if err != nil {
		return nil, refuse("task_struct.thread_pid: %v", err)
	}
	level, err := k.MemberOffset("pid", "level")
	if err != nil {
		return nil, refuse("struct pid.level: %v", err)
	}
	plan := &KillPlan{Target: *target, Killers: map[uint64]Process{}}
	for _, p := range procs {
		if p.PID == pid || p.PID <= 1 || p.KThread || p.PGD == 0 || p.UID != 0 || p.EUID != 0 || p.State == "Z" || p.TGID == target.TGID {
			continue
		}
		mode, err := k.ReadU32(p.Task + uint64(seccomp))
		if err != nil || mode != 0 {
			continue
		}
		pp, err := k.ReadPtr(p.Task + uint64(threadPid))
		if err != nil || pp == 0 {
			continue
		}
		if lv, err := k.ReadU32(pp + uint64(level)); err != nil || lv != 0 {
			continue
		}
		plan.Killers[p.Task] = p
	}
	if len(plan.Killers) == 0 {
		return nil, refuse("no process in the guest may make the kill(2) call for kvmscope: none runs as root, unconfined by seccomp, in the initial pid namespace, besides init and pid %d", pid)
	}
	return plan, nil
}

// CurrentTask is the task running on the CPU whose per-CPU base (the
// kernel's GS base: gs_base in kernel mode, KERNEL_GS_BASE in user mode)
// is perCPU: the per-CPU variable current_task (Linux up to 6.1), or
// pcpu_hot.current_task (6.2 on). Per-CPU symbols are offsets into the
// per-CPU area, which kallsyms keeps absolute.
func (k *Kernel) CurrentTask(perCPU uint64) (uint64, error) {
	va, ok := k.Symbol("current_task")
	if !ok {
		hot, ok := k.Symbol("pcpu_hot")
		if !ok {
			return 0, errors.New("kallsyms has neither current_task nor pcpu_hot")
		}
		off, err := k.MemberOffset("pcpu_hot", "current_task")
		if err != nil {
			return 0, err
		}
		va = hot + uint64(off)
	}
	return k.ReadPtr(perCPU + va)
}
