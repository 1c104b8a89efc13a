//go:build linux && amd64

package tracer

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// installFilter installs prog as a seccomp filter on the calling thread.
//
// Without CAP_SYS_ADMIN the kernel demands no_new_privs first. We set it only
// then: with no_new_privs a setuid helper QEMU may exec (qemu-bridge-helper)
// would lose its privileges, so a root wrapper keeps QEMU's usual behaviour.
//
// Precondition: the OS thread is locked and is the one that will execve.
func installFilter(prog []unix.SockFilter) error {
	if !hasCapSysAdmin() {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
		}
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	_, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&fprog)))
	if errno != 0 {
		return fmt.Errorf("seccomp(SECCOMP_SET_MODE_FILTER): %w", errno)
	}
	return nil
}

func hasCapSysAdmin() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[0].Effective&(1<<unix.CAP_SYS_ADMIN) != 0
}
