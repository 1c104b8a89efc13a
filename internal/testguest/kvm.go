package testguest

import (
	"fmt"
	"os"
	"syscall"
)

// KVM ioctls, from include/uapi/linux/kvm.h (_IO(KVMIO=0xAE, nr)).
const (
	kvmGetAPIVersion = 0xae00
	kvmCreateVM      = 0xae01
	kvmAPIVersion    = 12
)

// KVMAvailable returns nil when this process can use KVM: /dev/kvm opens
// read-write, speaks API version 12 and KVM_CREATE_VM succeeds. Otherwise it
// returns an error saying why, for tests to skip with.
func KVMAvailable() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("KVM unavailable: %w", err)
	}
	defer f.Close()
	fd := f.Fd()
	v, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, kvmGetAPIVersion, 0)
	if errno != 0 {
		return fmt.Errorf("KVM unavailable: KVM_GET_API_VERSION: %w", errno)
	}
	if v != kvmAPIVersion {
		return fmt.Errorf("KVM unavailable: API version %d, want %d", v, kvmAPIVersion)
	}
	vm, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, kvmCreateVM, 0)
	if errno != 0 {
		return fmt.Errorf("KVM unavailable: KVM_CREATE_VM: %w", errno)
	}
	syscall.Close(int(vm))
	return nil
}
