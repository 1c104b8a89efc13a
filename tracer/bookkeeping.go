//go:build linux && amd64

package tracer

import (
	"encoding/binary"

	"golang.org/x/sys/unix"
)

// vmCapture follows KVM_CREATE_VM and KVM_CREATE_VCPU: when one succeeds,
// the VM records it and maps the new vCPU's kvm_run (vm.go).
type vmCapture struct{ vm *VM }

func (h vmCapture) enter(c *call) verdict {
	return verdict{exit: c.cmd == KVMCreateVM || c.cmd == KVMCreateVCPU}
}

func (h vmCapture) exit(c *call, ret int64, failed bool) {
	if failed {
		return
	}
	switch c.cmd {
	case KVMCreateVM:
		h.vm.created(c.tid, int(ret))
	case KVMCreateVCPU:
		h.vm.vcpuCreated(c.tid, c.fd, int(c.arg), int(ret))
	}
}

// memslots follows KVM_SET_USER_MEMORY_REGION(2): the region is read at
// entry, with QEMU's other threads frozen, and applied to the table when
// the kernel accepted it. A region that cannot be read is failed with
// EFAULT, as the kernel would fail it: the table must never miss a slot
// the kernel holds.
type memslots struct{ vm *VM }

func (h memslots) enter(c *call) verdict {
	if c.cmd != KVMSetUserMemoryRegion && c.cmd != kvmSetUserMemoryRegion2 {
		return verdict{}
	}
	if _, err := c.decode(); err != nil {
		c.t.log.Warn().Err(err).Int("tid", c.tid).Msg("memslot argument unreadable; failing the call with EFAULT")
		return verdict{deny: true, errno: unix.EFAULT}
	}
	// A call on a slot the guard carved runs at the exit stop, on the
	// slot as QEMU made it (guard.go).
	return verdict{exit: true, skip: c.t.guard.touches(memslotOf(c.args.MemoryRegion()))}
}

func (h memslots) exit(c *call, ret int64, failed bool) {
	if c.args == nil {
		return
	}
	if c.skipped {
		_, failed = c.t.guardReplay(c)
	}
	if !failed {
		h.vm.memslotSet(c.fd, memslotOf(c.args.MemoryRegion()))
	}
	c.t.guardRearm(c)
}

// msrCapture keeps the guest MSRs KVM reports to QEMU, and which of them
// QEMU holds a copy of (msrs.go). kvm_run's sync regs carry no MSRs, and
// KVM refuses vCPU ioctls from any process but QEMU, so kvmscope reads
// them where QEMU does: every full state sync (HMP `info registers`,
// migration, the gdbstub) is a KVM_GET_MSRS on each vCPU fd, and at its
// exit the kernel has written the values into QEMU's buffer; the
// KVM_SET_MSRS that puts them back before the vCPU runs again ends
// QEMU's hold. KVM_GET_MSRS on /dev/kvm (feature MSRs, not the guest's)
// is ignored.
type msrCapture struct{ vm *VM }

func (h msrCapture) enter(c *call) verdict {
	if c.cmd != kvmGetMSRs && c.cmd != kvmSetMSRs || !h.vm.isVCPUFD(c.fd) {
		return verdict{}
	}
	if _, err := c.decode(); err != nil {
		return verdict{} // the kernel will fail it the same way
	}
	return verdict{exit: true}
}

func (h msrCapture) exit(c *call, ret int64, failed bool) {
	if failed || c.args == nil || ret <= 0 {
		return
	}
	index, _ := c.args.Get("index")
	// The kernel returns how many entries it read or wrote, in order.
	n := min(int(ret), len(index))
	if c.cmd == kvmSetMSRs {
		put := make([]uint32, n)
		for i := range put {
			put[i] = uint32(index[i])
		}
		h.vm.qemuWroteMSRs(c.fd, put)
		return
	}
	buf := make([]byte, 16*n)
	if err := c.ReadAt(buf, c.arg+8); err != nil {
		c.t.log.Debug().Err(err).Msg("KVM_GET_MSRS result unreadable")
		return
	}
	vals := make(map[uint32]uint64, n)
	for i := 0; i < n; i++ {
		vals[uint32(index[i])] = binary.LittleEndian.Uint64(buf[16*i+8:])
	}
	h.vm.qemuReadMSRs(c.fd, vals)
}
