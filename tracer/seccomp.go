//go:build linux && amd64

package tracer

import (
	"encoding/hex"
	"fmt"
	"slices"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// seccomp_data offsets (include/uapi/linux/seccomp.h): nr at 0, arch at 4.
const (
	seccompDataNR   = 0
	seccompDataArch = 4
	auditArchX8664  = 0xc000003e
	auditArchI386   = 0x40000003
	// x32SyscallBit marks an x32-ABI system call (arch is still x86-64;
	// arch/x86/include/uapi/asm/unistd.h __X32_SYSCALL_BIT).
	x32SyscallBit = 0x40000000
)

// bookkeeping are the requests the tracer itself must see: the VM, its
// vCPUs (to capture them), its memslots (the guest-physical map) and the
// MSRs KVM reports to QEMU and QEMU puts back (bookkeeping.go,
// msrCapture). KVM_GET_MSRS and KVM_SET_MSRS are rare: QEMU issues them
// at vCPU setup, reset and full state syncs only.
var bookkeeping = []uint32{KVMCreateVM, KVMCreateVCPU, KVMSetUserMemoryRegion, kvmSetUserMemoryRegion2, kvmGetMSRs, kvmSetMSRs}

// hot are the requests QEMU issues at a high rate while a guest runs; they
// are compared first so the filter's common path is short.
var hot = cmds("KVM_RUN", "KVM_IRQ_LINE_STATUS", "KVM_SIGNAL_MSI", "KVM_IOEVENTFD", "KVM_IRQFD")

// cmds looks requests up in the catalogue; a missing name is a bug.
func cmds(names ...string) []uint32 {
	out := make([]uint32, len(names))
	for i, n := range names {
		r, ok := ioctl.Lookup(n)
		if !ok {
			panic("tracer: " + n + " is not in the ioctl catalogue")
		}
		out[i] = r.Cmd
	}
	return out
}

// Filter is the seccomp program that decides which system calls stop in
// the tracer, as the policy's plan asks (p nil: no policy, only the
// tracer's bookkeeping):
//   - system calls of the i386 (int 0x80) and x32 ABIs stop, and the
//     tracer fails them: QEMU never makes them, and a filter that only
//     looked at x86-64 numbers would let them through unchecked;
//   - an ioctl stops when its request is one the plan traps, or when the
//     plan traps every request but the ones it allows;
//   - the kernel ignores a request's bits above the low 32 (the request
//     is an unsigned int), so they must not change the filter's verdict.
//     QEMU passes requests as an int, so one with bit 31 set arrives
//     sign-extended (0xffffffffc008ae67 for KVM_IRQ_LINE_STATUS): each
//     request is compared in both forms, and any other value with high
//     bits stops in the tracer;
//   - everything else runs without a stop.
func Filter(p *policy.Policy) ([]unix.SockFilter, error) {
	plan := policy.Plan{Trap: nil}
	if p != nil {
		plan = p.Plan()
	}
	ioctlCond := func(cmds []uint32) []seccomp.NameWithConditions {
		var out []seccomp.NameWithConditions
		for _, c := range cmds {
			for _, v := range requestValues(c) {
				out = append(out, seccomp.NameWithConditions{Name: "ioctl", Conditions: seccomp.ArgumentConditions{
					{Argument: 1, Operation: seccomp.Equal, Value: v},
				}})
			}
		}
		return out
	}
	// One group only: after a group whose conditions fail, the library
	// goes on to the next group with an argument, not the system call
	// number, in the accumulator, so a second group would compare the
	// wrong value.
	var group seccomp.SyscallGroup
	if plan.TrapAll {
		// Every request stops but the allowed ones: one condition set,
		// "arg1 is none of them".
		var notAllowed seccomp.ArgumentConditions
		for _, c := range ordered(without(plan.Allow, bookkeeping)) {
			for _, v := range requestValues(c) {
				notAllowed = append(notAllowed, seccomp.Condition{Argument: 1, Operation: seccomp.NotEqual, Value: v})
			}
		}
		group = seccomp.SyscallGroup{Names: []string{"ioctl"}, Action: seccomp.ActionTrace}
		if len(notAllowed) > 0 {
			group = seccomp.SyscallGroup{NamesWithCondtions: []seccomp.NameWithConditions{{Name: "ioctl", Conditions: notAllowed}}, Action: seccomp.ActionTrace}
		}
	} else {
		trap := ordered(union(plan.Trap, bookkeeping))
		conds := append(ioctlCond(trap), seccomp.NameWithConditions{Name: "ioctl", Conditions: seccomp.ArgumentConditions{
			{Argument: 1, Operation: seccomp.GreaterThan, Value: 0xffffffff},
			{Argument: 1, Operation: seccomp.LessThan, Value: signExtended},
		}})
		group = seccomp.SyscallGroup{NamesWithCondtions: conds, Action: seccomp.ActionTrace}
	}
	pol := seccomp.Policy{DefaultAction: seccomp.ActionAllow, Syscalls: []seccomp.SyscallGroup{group}}
	body, err := pol.Assemble()
	if err != nil {
		return nil, fmt.Errorf("assemble seccomp filter: %w", err)
	}
	// The library's own arch check sends other ABIs to the default action
	// (allow) and fails x32 calls without a stop; this prologue sends both
	// to the tracer first, which fails them and records it.
	prologue := []bpf.Instruction{
		bpf.LoadAbsolute{Off: seccompDataArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: auditArchX8664, SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_TRACE},
		bpf.LoadAbsolute{Off: seccompDataNR, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: x32SyscallBit, SkipFalse: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_TRACE},
	}
	raw, err := bpf.Assemble(append(prologue, body...))
	if err != nil {
		return nil, fmt.Errorf("assemble seccomp filter: %w", err)
	}
	if len(raw) > bpfMaxInsns {
		return nil, fmt.Errorf("seccomp filter of %d instructions exceeds the kernel's %d: the policy names too many requests", len(raw), bpfMaxInsns)
	}
	out := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		out[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return out, nil
}

// signExtended is the smallest 64-bit value that is a sign-extended
// 32-bit request with bit 31 set.
const signExtended = 0xffffffff80000000

// requestValues are the 64-bit forms in which request c reaches the
// system call: as is, and sign-extended when bit 31 is set.
func requestValues(c uint32) []uint64 {
	if c&0x80000000 != 0 {
		return []uint64{uint64(c), uint64(c) | 0xffffffff00000000}
	}
	return []uint64{uint64(c)}
}

// bpfMaxInsns is BPF_MAXINSNS (include/uapi/linux/bpf_common.h).
const bpfMaxInsns = 4096

// ordered puts the hot requests first, keeping the others' order.
func ordered(cmds []uint32) []uint32 {
	var out []uint32
	for _, h := range hot {
		if slices.Contains(cmds, h) {
			out = append(out, h)
		}
	}
	for _, c := range cmds {
		if !slices.Contains(hot, c) {
			out = append(out, c)
		}
	}
	return out
}

func union(a, b []uint32) []uint32 {
	out := append([]uint32(nil), a...)
	for _, c := range b {
		if !slices.Contains(out, c) {
			out = append(out, c)
		}
	}
	return out
}

func without(a, b []uint32) []uint32 {
	var out []uint32
	for _, c := range a {
		if !slices.Contains(b, c) {
			out = append(out, c)
		}
	}
	return out
}

// EncodeFilter writes a filter as text, for the pipe from the tracer to
// the process that installs it (internal/launch).
func EncodeFilter(prog []unix.SockFilter) string {
	b := make([]byte, 0, 8*len(prog))
	for _, f := range prog {
		b = append(b, byte(f.Code), byte(f.Code>>8), f.Jt, f.Jf, byte(f.K), byte(f.K>>8), byte(f.K>>16), byte(f.K>>24))
	}
	return hex.EncodeToString(b)
}

// DecodeFilter reads what EncodeFilter wrote.
func DecodeFilter(s string) ([]unix.SockFilter, error) {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) == 0 || len(b)%8 != 0 || len(b)/8 > bpfMaxInsns {
		return nil, fmt.Errorf("bad seccomp filter from the tracer")
	}
	out := make([]unix.SockFilter, len(b)/8)
	for i := range out {
		o := b[8*i:]
		out[i] = unix.SockFilter{Code: uint16(o[0]) | uint16(o[1])<<8, Jt: o[2], Jf: o[3], K: uint32(o[4]) | uint32(o[5])<<8 | uint32(o[6])<<16 | uint32(o[7])<<24}
	}
	return out, nil
}
