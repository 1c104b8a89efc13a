//go:build linux && amd64

package tracer

import (
	"errors"
	"fmt"
	"unsafe"
)

// Register writes through the kvm_run page.
//
// KVM refuses KVM_SET_REGS on our duplicate of the vCPU fd (another mm),
// but KVM_CAP_SYNC_REGS works both ways: at every KVM_RUN entry, before it
// completes a pending I/O exit or runs the guest, KVM loads the register
// sets named in kvm_dirty_regs from kvm_run->s.regs and clears their bits
// (arch/x86/kvm/x86.c, kvm_arch_vcpu_ioctl_run → sync_regs → __set_regs).
// QEMU never touches kvm_dirty_regs; when it puts registers itself
// (KVM_SET_REGS, only when cpu->vcpu_dirty) it does so before KVM_RUN,
// so ours are loaded after its and win.
//
// Only the general registers (struct kvm_regs: RAX..R15, RIP, RFLAGS) are
// written. KVM_SYNC_X86_SREGS would load segment and control registers
// the same way, but a wrong CR0/CR3/CR4/EFER or segment is a guest that
// cannot run, and __set_sregs also resets the MMU context: out of scope.

const (
	kvmRunDirtyRegsOffset = 296 // offsetof(struct kvm_run, kvm_dirty_regs)

	// Exits KVM completes only at the next KVM_RUN (Documentation/virt/
	// kvm/api.rst: "the corresponding operations are complete ... only
	// after userspace has re-entered the kernel"): the completion writes
	// RAX (port or MSR reads) or replays the instruction from the
	// emulator's copy of the registers, over what we would load.
	kvmExitIO        = 2
	kvmExitHypercall = 3
	kvmExitX86RDMSR  = 29
	kvmExitX86WRMSR  = 30
	kvmExitXen       = 34

	// rflagsValid are the RFLAGS bits a vCPU may have set (SDM vol. 1,
	// 3.4.3): CF, 1, PF, AF, ZF, SF, TF, IF, DF, OF, IOPL, NT, RF, VM, AC,
	// VIF, VIP, ID. Bit 1 is always set; any other bit fails VM entry.
	rflagsValid = 0x3f7fd7
	rflagsFixed = 1 << 1
)

// ErrVCPUBusy is returned when the vCPU stopped in an exit QEMU was still
// handling (port I/O, MMIO, an MSR access, a hypercall): KVM finishes that
// instruction at the next KVM_RUN, after loading our registers and over
// them. Resume the VM, let the exit complete, and try again.
var ErrVCPUBusy = errors.New("the vCPU is in the middle of an I/O exit; try again")

// SetRegisters changes the general registers of vCPU id: change gets a
// copy of the registers KVM will load at the vCPU's next KVM_RUN, and what
// it leaves there is written to the kvm_run page with KVM_SYNC_X86_REGS set
// in kvm_dirty_regs, so KVM loads them at that entry. It returns the
// registers before and after (new as read back from kvm_run).
//
// Precondition: QEMU is paused (Tracer.Pause): every thread SIGSTOPped,
// so the vCPU thread is outside KVM_RUN, KVM's stop made it store the
// registers in kvm_run (we keep kvm_valid_regs set), and those are the
// vCPU's current registers. SetRegisters checks that the vCPU thread is
// stopped and refuses otherwise.
func (v *VM) SetRegisters(id int, change func(*KVMRegs)) (old, new KVMRegs, err error) {
	c, pid, err := v.vcpu(id)
	if err != nil {
		return old, new, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gone {
		return old, new, fmt.Errorf("vCPU %d: its thread has exited", id)
	}
	if stopped, _, ok := taskStopped(fmt.Sprintf("/proc/%d/task/%d/stat", pid, c.TID)); !ok || !stopped {
		return old, new, fmt.Errorf("vCPU %d: its thread is not stopped (pause QEMU first)", id)
	}
	r := c.run
	if *r.u64(kvmRunValidRegsOffset)&kvmSyncX86Regs == 0 {
		return old, new, fmt.Errorf("vCPU %d: KVM does not publish its registers (kvm_valid_regs was cleared)", id)
	}
	switch r.mem[KVMRunExitReasonOffset] {
	case kvmExitIO, kvmExitHypercall, kvmExitMMIO, kvmExitX86RDMSR, kvmExitX86WRMSR, kvmExitXen:
		return old, new, fmt.Errorf("vCPU %d: %w", id, ErrVCPUBusy)
	}
	s := r.syncRegs()
	if s.Regs.RFLAGS&rflagsFixed == 0 {
		// KVM sets bit 1 in every RFLAGS it stores: these were never
		// stored (the vCPU has not left KVM_RUN since we mapped it).
		return old, new, fmt.Errorf("vCPU %d: KVM has not stored its registers yet", id)
	}
	old = s.Regs
	new = old
	change(&new)
	if err := checkRegs(new, old, s.Sregs); err != nil {
		return old, old, fmt.Errorf("vCPU %d: %w", id, err)
	}
	regs := (*KVMRegs)(unsafe.Pointer(&r.mem[kvmRunSyncRegsOffset]))
	*regs = new
	*r.u64(kvmRunDirtyRegsOffset) |= kvmSyncX86Regs
	if back := r.syncRegs().Regs; back != new || *r.u64(kvmRunDirtyRegsOffset)&kvmSyncX86Regs == 0 {
		// Our own shared page: only a mapping gone wrong gets here.
		*regs = old
		return old, old, fmt.Errorf("vCPU %d: kvm_run did not hold the registers written", id)
	}
	v.log.Info().Int("vcpu", id).Msg("vCPU registers written to kvm_run; KVM loads them at the next KVM_RUN")
	return old, new, nil
}

// checkRegs refuses values that would make VM entry fail (KVM would
// report an internal error and QEMU stop the VM): reserved RFLAGS bits,
// and a RIP the vCPU's mode cannot hold.
func checkRegs(new, old KVMRegs, s KVMSregs) error {
	if new.RFLAGS&^rflagsValid != 0 || new.RFLAGS&rflagsFixed == 0 {
		return fmt.Errorf("rflags %#x: reserved bits set or bit 1 clear (valid bits %#x, bit 1 always set)", new.RFLAGS, rflagsValid)
	}
	if new.RIP == old.RIP {
		return nil
	}
	const eferLMA, cr4LA57 = 1 << 10, 1 << 12
	switch {
	case s.EFER&eferLMA != 0 && s.CS.L != 0:
		bits := uint(48)
		if s.CR4&cr4LA57 != 0 {
			bits = 57
		}
		if top := int64(new.RIP) >> (bits - 1); top != 0 && top != -1 {
			return fmt.Errorf("rip %#x is not canonical (%d-bit virtual addresses)", new.RIP, bits)
		}
	case new.RIP>>32 != 0:
		return fmt.Errorf("rip %#x does not fit the vCPU's 32-bit mode", new.RIP)
	}
	return nil
}

// u64 is the kvm_run field at off.
func (r *kvmRun) u64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&r.mem[off])) }
