//go:build linux && amd64

package tracer

import (
	"encoding/binary"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Small wrappers, one ptrace request each.
// Precondition for all: the calling OS thread is the tracer thread.

const traceOptions = unix.PTRACE_O_TRACESECCOMP | unix.PTRACE_O_TRACESYSGOOD |
	unix.PTRACE_O_TRACECLONE | unix.PTRACE_O_TRACEFORK | unix.PTRACE_O_TRACEVFORK |
	unix.PTRACE_O_TRACEEXEC | unix.PTRACE_O_EXITKILL

func ptrace(req int, tid int, addr, data uintptr) error {
	_, _, errno := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(tid), addr, data, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// seize attaches to tid with our options; PTRACE_O_EXITKILL makes the kernel
// SIGKILL QEMU if kvmscope dies (see docs/how-it-works.md: fail closed).
func seize(tid int) error { return ptrace(unix.PTRACE_SEIZE, tid, 0, traceOptions) }

// cont resumes tid, delivering sig (0 for none).
func cont(tid int, sig int) error { return ptrace(unix.PTRACE_CONT, tid, 0, uintptr(sig)) }

// syscallExit resumes tid until its current system call returns.
func syscallExit(tid int) error { return ptrace(unix.PTRACE_SYSCALL, tid, 0, 0) }

// listen lets a group-stopped tid stay stopped while still reporting events.
func listen(tid int) error { return ptrace(unix.PTRACE_LISTEN, tid, 0, 0) }

// interrupt stops a running tid (PTRACE_SEIZE'd tasks only); it reports a
// PTRACE_EVENT_STOP, or whatever stop it reaches first.
func interrupt(tid int) error { return ptrace(unix.PTRACE_INTERRUPT, tid, 0, 0) }

// failSyscall makes tid, in a seccomp stop, skip its system call and see
// -errno as its result: the kernel skips a call whose number the tracer
// set to -1 and leaves rax as the tracer wrote it (seccomp(2), "the
// tracer can skip the system call").
func failSyscall(tid int, errno unix.Errno) error {
	var regs unix.PtraceRegs
	if err := unix.PtraceGetRegs(tid, &regs); err != nil {
		return fmt.Errorf("PTRACE_GETREGS(%d): %w", tid, err)
	}
	regs.Orig_rax = ^uint64(0)
	regs.Rax = uint64(-int64(errno))
	if err := unix.PtraceSetRegs(tid, &regs); err != nil {
		return fmt.Errorf("PTRACE_SETREGS(%d): %w", tid, err)
	}
	return nil
}

// syscallInfo is the part of struct ptrace_syscall_info (include/uapi/linux/ptrace.h)
// the tracer uses.
type syscallInfo struct {
	Op   uint8
	Arch uint32    // AUDIT_ARCH_* of the call (i386 for int 0x80)
	NR   uint64    // entry and seccomp stops
	Args [6]uint64 // entry and seccomp stops
	Rval int64     // exit stops
	Err  bool      // exit stops: rval is -errno
}

const (
	syscallInfoEntry   = 1
	syscallInfoExit    = 2
	syscallInfoSeccomp = 3
)

// getSyscallInfo reads PTRACE_GET_SYSCALL_INFO for a thread in a syscall,
// seccomp or syscall-exit stop.
func getSyscallInfo(tid int) (syscallInfo, error) {
	var buf [88]byte
	err := ptrace(unix.PTRACE_GET_SYSCALL_INFO, tid, uintptr(len(buf)), uintptr(unsafe.Pointer(&buf[0])))
	if err != nil {
		return syscallInfo{}, fmt.Errorf("PTRACE_GET_SYSCALL_INFO(%d): %w", tid, err)
	}
	le := binary.LittleEndian
	si := syscallInfo{Op: buf[0], Arch: le.Uint32(buf[4:])}
	switch si.Op {
	case syscallInfoEntry, syscallInfoSeccomp:
		si.NR = le.Uint64(buf[24:])
		for i := range si.Args {
			si.Args[i] = le.Uint64(buf[32+8*i:])
		}
	case syscallInfoExit:
		si.Rval = int64(le.Uint64(buf[24:]))
		si.Err = buf[32] != 0
	}
	return si, nil
}

// getEventMsg returns PTRACE_GETEVENTMSG (the new tid after a clone event).
func getEventMsg(tid int) (uint64, error) {
	var msg uint64
	err := ptrace(unix.PTRACE_GETEVENTMSG, tid, 0, uintptr(unsafe.Pointer(&msg)))
	return msg, err
}

// ptraceBuf is a ptrace request whose data argument is a buffer
// (PTRACE_GETSIGINFO).
func ptraceBuf(req, tid int, b []byte) error {
	return ptrace(req, tid, 0, uintptr(unsafe.Pointer(&b[0])))
}
