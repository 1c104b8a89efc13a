//go:build linux && amd64

package tracer

import (
	"fmt"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// kvmRun is our mapping of one vCPU's struct kvm_run page, shared with KVM
// and QEMU.
type kvmRun struct {
	fd  int    // our duplicate of QEMU's vCPU fd
	mem []byte // the mmap of fd
	// valid0 is kvm_valid_regs as we found it, for restoreSyncRegs.
	valid0 uint64
}

var (
	mmapSizeOnce sync.Once
	mmapSize     = 4096
)

// vcpuMmapSize asks KVM for the size of the kvm_run mapping. Only the first
// page holds struct kvm_run (the rest is the PIO and coalesced-MMIO rings),
// so one page is enough if /dev/kvm cannot be opened by us.
func vcpuMmapSize() int {
	mmapSizeOnce.Do(func() {
		fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return
		}
		defer unix.Close(fd)
		n, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), KVMGetVCPUMmapSize, 0)
		if errno == 0 && n >= 4096 && n <= 1<<20 {
			mmapSize = int(n)
		}
	})
	return mmapSize
}

// mapVCPU duplicates QEMU's vCPU fd into our process and maps its kvm_run.
//
// KVM refuses KVM_GET_REGS and friends on the duplicate (EIO: the vCPU
// belongs to QEMU's mm), but the shared kvm_run page works, and with
// kvm_valid_regs set KVM copies regs/sregs/events into it on every exit
// from KVM_RUN. QEMU (7.2 at least) never writes kvm_valid_regs.
func mapVCPU(pidfd int, qemuFD int) (*kvmRun, error) {
	fd, err := unix.PidfdGetfd(pidfd, qemuFD, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_getfd(vcpu fd %d): %w", qemuFD, err)
	}
	mem, err := unix.Mmap(fd, 0, vcpuMmapSize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mmap kvm_run of vcpu fd %d: %w", qemuFD, err)
	}
	r := &kvmRun{fd: fd, mem: mem}
	r.valid0 = *(*uint64)(unsafe.Pointer(&r.mem[kvmRunValidRegsOffset]))
	r.requestSyncRegs()
	return r, nil
}

// restoreSyncRegs puts kvm_valid_regs back as we found it (a detach
// leaves QEMU's kvm_run as it was).
func (r *kvmRun) restoreSyncRegs() {
	*(*uint64)(unsafe.Pointer(&r.mem[kvmRunValidRegsOffset])) = r.valid0
}

// requestSyncRegs sets kvm_valid_regs so KVM publishes registers at exits.
func (r *kvmRun) requestSyncRegs() {
	p := (*uint64)(unsafe.Pointer(&r.mem[kvmRunValidRegsOffset]))
	*p = kvmSyncX86Regs | kvmSyncX86Sregs | kvmSyncX86Events
}

// syncRegs copies the registers KVM last stored. The copy is consistent
// only while the vCPU thread is stopped (or not in KVM_RUN).
func (r *kvmRun) syncRegs() SyncRegs {
	return *(*SyncRegs)(unsafe.Pointer(&r.mem[kvmRunSyncRegsOffset]))
}

func (r *kvmRun) close() {
	unix.Munmap(r.mem)
	unix.Close(r.fd)
}

// Compile-time layout checks against the kernel's UAPI sizes.
var (
	_ [144]byte = [unsafe.Sizeof(KVMRegs{})]byte{}
	_ [24]byte  = [unsafe.Sizeof(KVMSegment{})]byte{}
	_ [312]byte = [unsafe.Sizeof(KVMSregs{})]byte{}
)

// MarshalBinary is the registers as KVM lays them out (struct kvm_regs then
// struct kvm_sregs, native byte order): how they cross the socket to the
// analysis process (tracer/handoff), which gob would otherwise encode
// field by field, about 150 of them, at every register read.
func (s SyncRegs) MarshalBinary() ([]byte, error) {
	b := make([]byte, unsafe.Sizeof(s))
	*(*SyncRegs)(unsafe.Pointer(&b[0])) = s
	return b, nil
}

// UnmarshalBinary is the inverse of MarshalBinary.
func (s *SyncRegs) UnmarshalBinary(b []byte) error {
	if len(b) != int(unsafe.Sizeof(*s)) {
		return fmt.Errorf("registers: %d bytes, want %d", len(b), unsafe.Sizeof(*s))
	}
	*s = *(*SyncRegs)(unsafe.Pointer(&b[0]))
	return nil
}
