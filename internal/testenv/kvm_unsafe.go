//go:build linux && amd64

package testenv

import (
	"errors"
	"fmt"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kvmscope/kvmscope/tracer"
)

// The tracer's KVM ioctl numbers (defined once, in tracer/kvm.go), and the
// API version and exit reasons only the probe needs (include/uapi/linux/kvm.h).
const (
	kvmGetAPIVersion       = tracer.KVMGetAPIVersion
	kvmCreateVM            = tracer.KVMCreateVM
	kvmGetVCPUMmapSize     = tracer.KVMGetVCPUMmapSize
	kvmCreateVCPU          = tracer.KVMCreateVCPU
	kvmSetUserMemoryRegion = tracer.KVMSetUserMemoryRegion
	kvmRun                 = tracer.KVMRun
	kvmAPIVersion          = 12
	kvmExitHLT             = 5
	kvmExitIntr            = 10
)

// kvmUsable returns nil when this process can use KVM: /dev/kvm opens
// read-write, speaks API version 12 and KVM_CREATE_VM succeeds.
func kvmUsable() error {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/kvm: %w", err)
	}
	defer unix.Close(fd)
	v, err := ioctl(fd, kvmGetAPIVersion, 0)
	if err != nil {
		return fmt.Errorf("KVM_GET_API_VERSION: %w", err)
	}
	if v != kvmAPIVersion {
		return fmt.Errorf("KVM API version %d, want %d", v, kvmAPIVersion)
	}
	vm, err := ioctl(fd, kvmCreateVM, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	unix.Close(int(vm))
	return nil
}

// probeLoops is how often the probe's guest loop runs: 2 instructions a
// loop. Hardware (or nested, TCG-emulated) virtualization runs them in well
// under a millisecond; a backend that emulates guest ring-0 code
// instruction by instruction (about 2e5 a second, on this project's earlier
// hosts) needs seconds; the machines here in 2026-12 run it in about 0.3 s (too slow to boot Linux in a minute).
const (
	probeLoops = 200000
	probeLimit = 50 * time.Millisecond
)

// kvmFast runs a tiny real-mode guest, a countdown loop and hlt at the x86
// reset vector, and times it: it tells a KVM that boots Linux from one that
// only gets as far as firmware.
func kvmFast() error {
	d, err := timeProbe()
	if err != nil {
		return fmt.Errorf("KVM speed probe: %w", err)
	}
	if d > probeLimit {
		return fmt.Errorf("KVM runs guest code too slowly to boot Linux: %d guest loop iterations took %v (limit %v)", probeLoops, d.Round(time.Millisecond), probeLimit)
	}
	return nil
}

func timeProbe() (time.Duration, error) {
	kvm, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(kvm)
	vmfd, err := ioctl(kvm, kvmCreateVM, 0)
	if err != nil {
		return 0, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	vm := int(vmfd)
	defer unix.Close(vm)

	// 64 KiB at the top of the 4 GiB space, where a vCPU starts after
	// reset: CS base 0xffff0000, IP 0xfff0.
	const base, size = 0xffff0000, 0x10000
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, err
	}
	defer unix.Munmap(mem)
	loop := []byte{
		0x66, 0xb9, probeLoops & 0xff, probeLoops >> 8 & 0xff, probeLoops >> 16 & 0xff, 0, // mov ecx, probeLoops
		0x66, 0x49, // 1: dec ecx
		0x75, 0xfc, // jnz 1b
		0xf4, // hlt
	}
	copy(mem[0xffd0:], loop)
	copy(mem[0xfff0:], []byte{0xeb, 0xde}) // jmp 0xffd0
	region := struct {
		slot, flags                   uint32
		guestPhys, memSize, userspace uint64
	}{0, 0, base, size, uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vm, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		return 0, fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	vcpufd, err := ioctl(vm, kvmCreateVCPU, 0)
	if err != nil {
		return 0, fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	vcpu := int(vcpufd)
	defer unix.Close(vcpu)
	runSize, err := ioctl(kvm, kvmGetVCPUMmapSize, 0)
	if err != nil {
		return 0, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := unix.Mmap(vcpu, 0, int(runSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return 0, fmt.Errorf("mmap kvm_run: %w", err)
	}
	defer unix.Munmap(run)
	start := time.Now()
	for {
		if _, err := ioctl(vcpu, kvmRun, 0); err != nil && !errors.Is(err, unix.EINTR) {
			return 0, fmt.Errorf("KVM_RUN: %w", err)
		}
		switch reason := *(*uint32)(unsafe.Pointer(&run[tracer.KVMRunExitReasonOffset])); reason {
		case kvmExitHLT:
			return time.Since(start), nil
		case kvmExitIntr:
			continue
		default:
			return 0, fmt.Errorf("KVM_RUN: exit reason %d, want hlt", reason)
		}
	}
}

func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}
