//go:build linux && amd64

package tracer

import (
	"bytes"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// readTask reads len(b) bytes at addr in task pid's address space.
func readTask(pid int, addr uint64, b []byte) error {
	local := []unix.Iovec{{Base: &b[0]}}
	local[0].SetLen(len(b))
	remote := []unix.RemoteIovec{{Base: uintptr(addr), Len: len(b)}}
	n, err := unix.ProcessVMReadv(pid, local, remote, 0)
	if err != nil {
		return fmt.Errorf("process_vm_readv(%d, %#x): %w", pid, addr, err)
	}
	if n != len(b) {
		return fmt.Errorf("process_vm_readv(%d, %#x): short read %d/%d", pid, addr, n, len(b))
	}
	return nil
}

// tgidOf returns the thread-group id of tid.
func tgidOf(tid int) int {
	var tgid int
	// /proc/TID/status has "Tgid:\tN"; the kernel accepts a tid here.
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return tid
	}
	if _, err := fmt.Sscanf(findLine(b, "Tgid:"), "Tgid:\t%d", &tgid); err != nil {
		return tid
	}
	return tgid
}

// findLine returns the line of b that starts with prefix, or "".
func findLine(b []byte, prefix string) string {
	for _, l := range bytes.Split(b, []byte("\n")) {
		if bytes.HasPrefix(l, []byte(prefix)) {
			return string(l)
		}
	}
	return ""
}

// writeTask writes b at addr in task pid's address space.
func writeTask(pid int, addr uint64, b []byte) error {
	local := []unix.Iovec{{Base: &b[0]}}
	local[0].SetLen(len(b))
	remote := []unix.RemoteIovec{{Base: uintptr(addr), Len: len(b)}}
	n, err := unix.ProcessVMWritev(pid, local, remote, 0)
	if err != nil {
		return fmt.Errorf("process_vm_writev(%d, %#x): %w", pid, addr, err)
	}
	if n != len(b) {
		return fmt.Errorf("process_vm_writev(%d, %#x): short write %d/%d", pid, addr, n, len(b))
	}
	return nil
}
