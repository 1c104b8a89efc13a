package guestmem

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/kvmscope/kvmscope/tracer"
)

// RegisterWriter is a Source that can change a vCPU's general registers
// (the live KVM source with --allow-write). set maps register names
// (RegisterNames) to values; old and new hold the same names, before and
// after. The caller pauses the guest around the call (the KVM source
// refuses a vCPU that is not stopped).
type RegisterWriter interface {
	SetRegisters(ctx context.Context, id int, set map[string]uint64) (old, new map[string]uint64, err error)
}

// RegisterReader is a Source that reads a vCPU's general registers, by
// RegisterNames, as fresh as it can: fresh is false when the vCPU did not
// leave the guest to answer and the values are those it last stored.
type RegisterReader interface {
	GeneralRegisters(ctx context.Context, id int) (regs map[string]uint64, fresh bool, err error)
}

// MSRWriter is a Source that can change a vCPU's MSRs (MSRNames) with
// KVM_SET_MSRS run as QEMU (tracer.VM.SetMSRs), which stops the whole VM
// for the write itself: the caller must not pause it (a stopped QEMU
// thread cannot run the call). ReadMSRs reads them the same way.
type MSRWriter interface {
	SetMSRs(ctx context.Context, id int, set map[string]uint64) (old, new map[string]uint64, err error)
	ReadNamedMSRs(ctx context.Context, id int, names []string) (map[string]uint64, error)
}

// MSRNames are the MSRs MSRWriter writes (tracer.WritableMSRs), sorted.
var MSRNames = slices.Sorted(maps.Keys(tracer.WritableMSRs))

// SplitRegisters parts set (checked by CheckRegisterNames) into general
// registers and MSRs, which are written two different ways.
func SplitRegisters(set map[string]uint64) (general, msrs map[string]uint64) {
	general, msrs = map[string]uint64{}, map[string]uint64{}
	for name, v := range set {
		if _, ok := tracer.WritableMSRs[name]; ok {
			msrs[name] = v
		} else {
			general[name] = v
		}
	}
	return general, msrs
}

// RegisterNames are the general registers RegisterWriter writes, in
// struct kvm_regs order.
var RegisterNames = []string{
	"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
	"r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
	"rip", "rflags",
}

// CheckRegisterNames refuses an empty set and any name not in
// RegisterNames or MSRNames (segment and control registers are not
// written: a wrong one is a guest that cannot run).
func CheckRegisterNames(set map[string]uint64) error {
	if len(set) == 0 {
		return fmt.Errorf("no registers to write (give e.g. rax=0x1)")
	}
	var bad []string
	for name := range set {
		if _, msr := tracer.WritableMSRs[name]; !msr && !slices.Contains(RegisterNames, name) {
			bad = append(bad, fmt.Sprintf("%q", name))
		}
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		what := "register"
		if len(bad) > 1 {
			what = "registers"
		}
		return fmt.Errorf("%s %s cannot be written: only the general registers %s and the MSRs %s", what, strings.Join(bad, ", "), strings.Join(RegisterNames, " "), strings.Join(MSRNames, " "))
	}
	return nil
}

// ErrReadOnlyRegisters is ErrReadOnly for register writes: errors.Is
// matches both.
var ErrReadOnlyRegisters error = readOnlyRegisters{}

type readOnlyRegisters struct{}

func (readOnlyRegisters) Error() string {
	return "vCPU registers are read-only (start kvmscope run with --allow-write)"
}

func (readOnlyRegisters) Is(target error) bool { return target == ErrReadOnly }
