//go:build linux && amd64

package guestmem

import (
	"context"
	"fmt"
)

// Attached is a KVM guest that kvmscope attached to while it ran
// (kvmscope attach --ptrace): its memory as QEMU's monitor maps it (the
// TCG source's way: the memslot table was built before we came and is
// not known), its vCPUs through the tracer's handles (the Live source's
// way: kvm_run sync regs copied at a kick stop, register writes).
type Attached struct {
	*TCG
	vcpus *Live
}

// NewAttached joins mem, the monitor's view of guest memory, with the
// vCPUs of vm.
func NewAttached(mem *TCG, vm VM, allowWrite bool) *Attached {
	return &Attached{TCG: mem, vcpus: NewLive(vm, allowWrite)}
}

// CPUs are fresh registers of every vCPU, from kvm_run.
func (a *Attached) CPUs(ctx context.Context) ([]CPU, error) { return a.vcpus.CPUs(ctx) }

// ReadEntryMSRs is Live.ReadEntryMSRs.
func (a *Attached) ReadEntryMSRs(ctx context.Context) error { return a.vcpus.ReadEntryMSRs(ctx) }

// SetRegisters is Live.SetRegisters.
func (a *Attached) SetRegisters(ctx context.Context, id int, set map[string]uint64) (old, new map[string]uint64, err error) {
	return a.vcpus.SetRegisters(ctx, id, set)
}

// SetMSRs is Live.SetMSRs, for a running VM only. Attached, the tracer
// has no seccomp filter and does not see QEMU's own KVM_GET_MSRS and
// KVM_SET_MSRS, so it cannot tell when QEMU holds a synced copy of the
// MSRs that it will write back over ours. A running QEMU writes its copy
// back before the vCPU's next KVM_RUN, which the fresh read back then
// shows; a VM its monitor stopped can hold one until `cont`.
func (a *Attached) SetMSRs(ctx context.Context, id int, set map[string]uint64) (old, new map[string]uint64, err error) {
	if q := a.Commands(); q != nil {
		running, status, err := Status(ctx, q)
		if err != nil {
			return nil, nil, err
		}
		if !running {
			return nil, nil, fmt.Errorf("the VM is not running (%s): attached, kvmscope cannot see whether QEMU holds a copy of the MSRs that it writes back when it resumes; resume it first", status)
		}
	}
	return a.vcpus.SetMSRs(ctx, id, set)
}

// ReadNamedMSRs is Live.ReadNamedMSRs.
func (a *Attached) ReadNamedMSRs(ctx context.Context, id int, names []string) (map[string]uint64, error) {
	return a.vcpus.ReadNamedMSRs(ctx, id, names)
}

// GeneralRegisters is Live.GeneralRegisters.
func (a *Attached) GeneralRegisters(ctx context.Context, id int) (map[string]uint64, bool, error) {
	return a.vcpus.GeneralRegisters(ctx, id)
}
