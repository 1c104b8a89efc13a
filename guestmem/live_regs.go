//go:build linux && amd64

package guestmem

import (
	"context"
	"errors"
	"fmt"

	"github.com/kvmscope/kvmscope/tracer"
)

// SetRegisters writes general registers of vCPU id through the tracer
// (tracer.VM.SetRegisters: the kvm_run sync regs, loaded by KVM at the
// vCPU's next KVM_RUN). QEMU must be paused. Only with allowWrite.
func (l *Live) SetRegisters(ctx context.Context, id int, set map[string]uint64) (old, new map[string]uint64, err error) {
	if !l.write {
		return nil, nil, ErrReadOnlyRegisters
	}
	if err := CheckRegisterNames(set); err != nil {
		return nil, nil, err
	}
	if _, msrs := SplitRegisters(set); len(msrs) > 0 {
		return nil, nil, errors.New("MSRs are written apart from the general registers (SetMSRs)")
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	o, n, err := l.vm.SetRegisters(id, func(r *tracer.KVMRegs) {
		for name, v := range set {
			*kvmReg(r, name) = v
		}
	})
	if err != nil {
		return nil, nil, fmt.Errorf("write registers: %w", err)
	}
	return regsByName(o, set), regsByName(n, set), nil
}

// SetMSRs writes MSRs of vCPU id (MSRNames) through the tracer
// (tracer.VM.SetMSRs: KVM_SET_MSRS as QEMU, the VM frozen meanwhile, read
// back before it runs). QEMU must not be paused. Only with allowWrite.
func (l *Live) SetMSRs(ctx context.Context, id int, set map[string]uint64) (old, new map[string]uint64, err error) {
	if !l.write {
		return nil, nil, ErrReadOnlyRegisters
	}
	if err := CheckRegisterNames(set); err != nil {
		return nil, nil, err
	}
	idx := make(map[uint32]uint64, len(set))
	for name, v := range set {
		i, ok := tracer.WritableMSRs[name]
		if !ok {
			return nil, nil, fmt.Errorf("%s is a general register, not an MSR", name)
		}
		idx[i] = v
	}
	o, n, err := l.vm.SetMSRs(ctx, id, idx)
	if err != nil {
		return nil, nil, fmt.Errorf("write MSRs: %w", err)
	}
	return msrsByName(o), msrsByName(n), nil
}

// ReadNamedMSRs has KVM read MSRs (MSRNames) of vCPU id now.
func (l *Live) ReadNamedMSRs(ctx context.Context, id int, names []string) (map[string]uint64, error) {
	idx := make([]uint32, 0, len(names))
	for _, name := range names {
		i, ok := tracer.WritableMSRs[name]
		if !ok {
			return nil, fmt.Errorf("%s is not an MSR kvmscope names", name)
		}
		idx = append(idx, i)
	}
	vals, err := l.vm.ReadMSRs(ctx, id, idx)
	if err != nil {
		return nil, fmt.Errorf("MSRs of vCPU %d: %w", id, err)
	}
	return msrsByName(vals), nil
}

// msrsByName names the MSRs of vals that tracer.WritableMSRs names.
func msrsByName(vals map[uint32]uint64) map[string]uint64 {
	out := make(map[string]uint64, len(vals))
	for name, i := range tracer.WritableMSRs {
		if v, ok := vals[i]; ok {
			out[name] = v
		}
	}
	return out
}

// GeneralRegisters reads the general registers of vCPU id, fresh (the
// vCPU is kicked, see tracer.VM.Registers).
func (l *Live) GeneralRegisters(ctx context.Context, id int) (map[string]uint64, bool, error) {
	s, err := l.vm.Registers(ctx, id)
	if err != nil {
		return nil, false, fmt.Errorf("registers of vCPU %d: %w", id, err)
	}
	out := make(map[string]uint64, len(RegisterNames))
	for _, name := range RegisterNames {
		out[name] = *kvmReg(&s.Regs.Regs, name)
	}
	return out, s.Fresh, nil
}

// regsByName picks the registers named in set from r.
func regsByName(r tracer.KVMRegs, set map[string]uint64) map[string]uint64 {
	out := make(map[string]uint64, len(set))
	for name := range set {
		out[name] = *kvmReg(&r, name)
	}
	return out
}

// kvmReg is the field of r that RegisterNames calls name; the names were
// checked (CheckRegisterNames), so an unknown one is a bug.
func kvmReg(r *tracer.KVMRegs, name string) *uint64 {
	switch name {
	case "rax":
		return &r.RAX
	case "rbx":
		return &r.RBX
	case "rcx":
		return &r.RCX
	case "rdx":
		return &r.RDX
	case "rsi":
		return &r.RSI
	case "rdi":
		return &r.RDI
	case "rsp":
		return &r.RSP
	case "rbp":
		return &r.RBP
	case "r8":
		return &r.R8
	case "r9":
		return &r.R9
	case "r10":
		return &r.R10
	case "r11":
		return &r.R11
	case "r12":
		return &r.R12
	case "r13":
		return &r.R13
	case "r14":
		return &r.R14
	case "r15":
		return &r.R15
	case "rip":
		return &r.RIP
	case "rflags":
		return &r.RFLAGS
	}
	panic("guestmem: unknown register " + name)
}
