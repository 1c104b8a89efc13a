//go:build linux && amd64

package tracer

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Guest MSRs. kvm_run's sync regs carry none, and KVM refuses vCPU ioctls
// from any process but QEMU, so kvmscope reads and writes them with
// KVM_GET_MSRS and KVM_SET_MSRS run as QEMU on the vCPU's own thread
// (inject.go), and keeps what QEMU itself reads (bookkeeping.go).
//
// QEMU keeps its own copy of a vCPU's MSRs. It reads them at a full state
// sync (HMP `info registers`, the gdbstub, migration: kvm_arch_get_registers)
// and writes that copy back (kvm_arch_put_registers) before the vCPU's
// next KVM_RUN. A write of ours between the two would be undone, so the
// tracer follows QEMU's KVM_GET_MSRS and KVM_SET_MSRS on every vCPU fd
// and refuses to write an MSR QEMU holds (ErrVCPUBusy: try again once the
// vCPU has run). Anywhere else QEMU's copy is stale and unused until its
// next sync reads ours.

const (
	kvmGetMSRs = 0xc008ae88 // KVM_GET_MSRS: _IOWR(KVMIO, 0x88, struct kvm_msrs)
	kvmSetMSRs = 0x4008ae89 // KVM_SET_MSRS: _IOW(KVMIO, 0x89, struct kvm_msrs)
)

// WritableMSRs are the MSRs SetMSRs writes, by the names kvmscope gives
// them (Intel SDM vol. 4, table 2-2). They are the system-call entry
// state and the per-CPU base that swapgs exchanges: what a rootkit hooks
// and a responder puts back. The CPU uses them only when the guest
// executes syscall, sysenter, swapgs or rdtscp, and KVM checks most as it
// would the guest's own WRMSR (a non-canonical LSTAR is refused; where it
// keeps less than written, as AMD's 32-bit SYSENTER_EIP, the read back
// catches it); none changes paging, the CPU mode or interrupt delivery. Refused, because a
// wrong value stops the guest at once or QEMU writes them back from a
// copy the tracer cannot follow: EFER, PAT, the APIC base, FS and GS base
// (QEMU's copy is its segment state, put back with KVM_SET_SREGS), the TSC.
var WritableMSRs = map[string]uint32{
	"sysenter_cs":    0x174,
	"sysenter_esp":   0x175,
	"sysenter_eip":   0x176,
	"star":           0xc0000081,
	"lstar":          0xc0000082,
	"cstar":          0xc0000083,
	"fmask":          0xc0000084,
	"kernel_gs_base": 0xc0000102,
	"tsc_aux":        0xc0000103,
}

// msrName is the WritableMSRs name of index, or its number.
func msrName(index uint32) string {
	for name, i := range WritableMSRs {
		if i == index {
			return name
		}
	}
	return fmt.Sprintf("MSR %#x", index)
}

// msrsSize is the size of a struct kvm_msrs of n entries: nmsrs, pad,
// then {index, reserved, data} each.
func msrsSize(n int) int { return 8 + 16*n }

// kvmMSRs builds a struct kvm_msrs of indices, with values from vals
// (zero for a read).
func kvmMSRs(indices []uint32, vals map[uint32]uint64) []byte {
	buf := make([]byte, msrsSize(len(indices)))
	binary.LittleEndian.PutUint32(buf, uint32(len(indices)))
	for i, x := range indices {
		binary.LittleEndian.PutUint32(buf[8+16*i:], x)
		binary.LittleEndian.PutUint64(buf[16+16*i:], vals[x])
	}
	return buf
}

// getMSRs runs KVM_GET_MSRS of indices on vCPU fd through run. KVM
// returns how many it read, in order, and stops at the first it does not
// know: out holds those.
func getMSRs(run runFunc, fd int, indices []uint32) (map[uint32]uint64, error) {
	buf := kvmMSRs(indices, nil)
	n, err := run(Syscall{NR: unix.SYS_IOCTL, Args: [6]uint64{uint64(fd), kvmGetMSRs}, Buf: buf, BufArg: 2})
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_MSRS: %w", err)
	}
	out := map[uint32]uint64{}
	for i := 0; i < int(n) && i < len(indices); i++ {
		out[indices[i]] = binary.LittleEndian.Uint64(buf[16+16*i:])
	}
	return out, nil
}

// setMSRs runs KVM_SET_MSRS of indices (values from vals) on vCPU fd
// through run, and returns how many KVM set: it stops at the first value
// it refuses, as the guest's WRMSR would fault on it.
func setMSRs(run runFunc, fd int, indices []uint32, vals map[uint32]uint64) (int, error) {
	n, err := run(Syscall{NR: unix.SYS_IOCTL, Args: [6]uint64{uint64(fd), kvmSetMSRs}, Buf: kvmMSRs(indices, vals), BufArg: 2})
	if err != nil {
		return 0, fmt.Errorf("KVM_SET_MSRS: %w", err)
	}
	return int(n), nil
}

// msrsRead records the MSR values a KVM_GET_MSRS on vCPU fd returned.
func (v *VM) msrsRead(fd int, vals map[uint32]uint64) {
	v.onMSRs(fd, func(c *VCPU) {
		if c.msrs == nil {
			c.msrs = map[uint32]uint64{}
		}
		maps.Copy(c.msrs, vals)
		c.msrsAt = time.Now()
	})
	// No notify: Wait is for the VM's shape (vCPUs, memslots), and QEMU
	// reads MSRs at every `info registers`; readers ask MSRs for them.
}

// qemuReadMSRs records a KVM_GET_MSRS QEMU made on vCPU fd: the values,
// and that QEMU now holds them until it writes them back.
func (v *VM) qemuReadMSRs(fd int, vals map[uint32]uint64) {
	v.msrsRead(fd, vals)
	v.onMSRs(fd, func(c *VCPU) {
		if c.qemuHolds == nil {
			c.qemuHolds = map[uint32]bool{}
		}
		for i := range vals {
			c.qemuHolds[i] = true
		}
	})
}

// qemuWroteMSRs records a KVM_SET_MSRS QEMU made on vCPU fd, of indices.
func (v *VM) qemuWroteMSRs(fd int, indices []uint32) {
	v.onMSRs(fd, func(c *VCPU) {
		for _, i := range indices {
			delete(c.qemuHolds, i)
		}
	})
}

// onMSRs runs fn on the vCPU of fd, if it is one, under its lock.
func (v *VM) onMSRs(fd int, fn func(*VCPU)) {
	c := v.vcpuByFD(fd)
	if c == nil {
		return
	}
	c.mu.Lock()
	fn(c)
	c.mu.Unlock()
}

// MSRs returns the guest MSRs of vCPU id that KVM last reported to QEMU,
// and when; none (a zero time) before QEMU's first full state sync of that
// vCPU. QEMU syncs at HMP `info registers`, migration and gdbstub stops.
func (v *VM) MSRs(id int) (map[uint32]uint64, time.Time) {
	c, _, err := v.vcpu(id)
	if err != nil {
		return nil, time.Time{}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.msrs), c.msrsAt
}

// ReadMSRs has KVM read the guest MSRs indices of vCPU id, with
// KVM_GET_MSRS run as QEMU on the vCPU's own thread, and records them as
// MSRs reports them. An index KVM does not know ends the list read.
func (v *VM) ReadMSRs(ctx context.Context, id int, indices []uint32) (map[uint32]uint64, error) {
	c, pid, err := v.vcpu(id)
	if err != nil {
		return nil, err
	}
	if len(indices) == 0 || msrsSize(len(indices)) > maxInjectBuf {
		return nil, fmt.Errorf("read MSRs: %d indices", len(indices))
	}
	var out map[uint32]uint64
	err = v.injectFunc(ctx, pid, c.TID, false, func(run runFunc) error {
		var err error
		out, err = getMSRs(run, c.FD, indices)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("vCPU %d: %w", id, err)
	}
	v.msrsRead(c.FD, out)
	return out, nil
}

// SetMSRs writes MSRs of vCPU id (indices of WritableMSRs) and returns
// them before and after (as read back). It runs with every QEMU thread
// stopped: the vCPU's own thread at the stop of QEMU's kick (outside
// KVM_RUN, so the vCPU ioctls do not wait for the vCPU's mutex) makes
// KVM_GET_MSRS, KVM_SET_MSRS and KVM_GET_MSRS again, while every other
// thread is frozen (freeze.go), so no vCPU runs guest code meanwhile.
// KVM loads the values into the VMCS or VMCB at the vCPU's next entry.
//
// It fails whole: when KVM refuses a value (it stops at the first) or
// one reads back otherwise, the values set are put back. ErrVCPUBusy when
// QEMU holds a copy of one of them it has not written back yet.
func (v *VM) SetMSRs(ctx context.Context, id int, set map[uint32]uint64) (old, new map[uint32]uint64, err error) {
	c, pid, err := v.vcpu(id)
	if err != nil {
		return nil, nil, err
	}
	indices := slices.Sorted(maps.Keys(set))
	if len(indices) == 0 {
		return nil, nil, errors.New("write MSRs: none given")
	}
	for _, i := range indices {
		if !writableMSR(i) {
			return nil, nil, fmt.Errorf("write MSRs: %s is not one kvmscope writes", msrName(i))
		}
	}
	err = v.injectFunc(ctx, pid, c.TID, true, func(run runFunc) error {
		if i, ok := c.heldByQEMU(indices); ok {
			return fmt.Errorf("QEMU holds a copy of %s from a state sync (monitor, gdbstub or migration) that it writes back before the vCPU runs: %w", msrName(i), ErrVCPUBusy)
		}
		var err error
		if old, err = getMSRs(run, c.FD, indices); err != nil {
			return err
		}
		if len(old) < len(indices) {
			return fmt.Errorf("KVM has no %s for this vCPU", msrName(indices[len(old)]))
		}
		n, err := setMSRs(run, c.FD, indices, set)
		if err != nil {
			return err
		}
		if n < len(indices) {
			return undoMSRs(run, c.FD, indices[:n], old, fmt.Errorf("KVM refused %s = %#x (the guest's own WRMSR would fault on it)", msrName(indices[n]), set[indices[n]]))
		}
		if new, err = getMSRs(run, c.FD, indices); err != nil {
			return undoMSRs(run, c.FD, indices, old, err)
		}
		for _, i := range indices {
			if new[i] != set[i] {
				return undoMSRs(run, c.FD, indices, old, fmt.Errorf("%s reads back as %#x, not %#x", msrName(i), new[i], set[i]))
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("vCPU %d: %w", id, err)
	}
	v.msrsRead(c.FD, new)
	v.log.Info().Int("vcpu", id).Int("msrs", len(indices)).Msg("vCPU MSRs written with KVM_SET_MSRS as QEMU")
	return old, new, nil
}

// undoMSRs puts the values old back into indices after a write that
// failed with why, and says whether that left the vCPU as it was.
func undoMSRs(run runFunc, fd int, indices []uint32, old map[uint32]uint64, why error) error {
	if len(indices) == 0 {
		return fmt.Errorf("%w; nothing was changed", why)
	}
	if n, err := setMSRs(run, fd, indices, old); err != nil || n < len(indices) {
		return fmt.Errorf("%w; putting the old values back failed too (%d of %d, %v): the vCPU may hold some of the new ones", why, n, len(indices), err)
	}
	return fmt.Errorf("%w; the old values were put back", why)
}

// writableMSR reports whether index is one of WritableMSRs.
func writableMSR(index uint32) bool {
	for _, i := range WritableMSRs {
		if i == index {
			return true
		}
	}
	return false
}

// heldByQEMU is the first of indices QEMU holds a copy of, if any.
func (c *VCPU) heldByQEMU(indices []uint32) (uint32, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, i := range indices {
		if c.qemuHolds[i] {
			return i, true
		}
	}
	return 0, false
}
