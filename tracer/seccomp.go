//go:build linux && amd64

package tracer

import (
	"fmt"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// seccomp_data offsets (include/uapi/linux/seccomp.h): nr at 0, arch at 4,
// instruction_pointer at 8, args[6] from 16. On little-endian x86-64 the low
// 32 bits of args[1] are at 24; ioctl command numbers are 32-bit and the
// kernel ignores the upper half (it is an unsigned int in the kernel's
// ioctl handler), so matching the low half catches every encoding.
const (
	seccompDataNR    = 0
	seccompDataArch  = 4
	seccompDataArg1L = 24
	auditArchX8664   = 0xc000003e
)

// trappedIoctls are the ioctl commands that stop in the tracer.
var trappedIoctls = []uint32{KVMCreateVM, KVMCreateVCPU, KVMSetUserMemoryRegion, kvmSetUserMemoryRegion2}

// buildFilter assembles the seccomp filter: RET_TRACE for ioctl calls whose
// command is one of cmds, RET_ALLOW for everything else. Non-x86-64 system
// calls (the 32-bit ABI) are allowed: QEMU never makes KVM ioctls that way.
func buildFilter(cmds []uint32) ([]unix.SockFilter, error) {
	prog := []bpf.Instruction{
		bpf.LoadAbsolute{Off: seccompDataArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: auditArchX8664, SkipTrue: uint8(len(cmds) + 3)},
		bpf.LoadAbsolute{Off: seccompDataNR, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: unix.SYS_IOCTL, SkipTrue: uint8(len(cmds) + 1)},
		bpf.LoadAbsolute{Off: seccompDataArg1L, Size: 4},
	}
	for i, c := range cmds {
		// On a match jump to the RET_TRACE that follows the last compare.
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: c, SkipTrue: uint8(len(cmds) - i)})
	}
	prog = append(prog,
		bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW},
		bpf.RetConstant{Val: unix.SECCOMP_RET_TRACE},
	)
	// The two early "not ours" jumps land on RET_ALLOW: fix their targets now
	// that the program length is known.
	allow := len(prog) - 2
	prog[1] = bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: auditArchX8664, SkipTrue: uint8(allow - 2)}
	prog[3] = bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: unix.SYS_IOCTL, SkipTrue: uint8(allow - 4)}

	raw, err := bpf.Assemble(prog)
	if err != nil {
		return nil, fmt.Errorf("assemble seccomp filter: %w", err)
	}
	out := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		out[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return out, nil
}
