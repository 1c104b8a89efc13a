//go:build linux && amd64

package tracer

import (
	"bytes"
	"fmt"
	"os"
	"strings"

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

// writeForced writes b at addr in pid's address space even where pid's
// mapping is read-only: through /proc/PID/mem (FOLL_FORCE) for a private
// mapping, through the mapped file (/proc/PID/map_files/LO-HI) for a
// shared one, which FOLL_FORCE does not write.
func writeForced(pid int, addr uint64, b []byte) error {
	f, err := os.OpenFile(fmt.Sprintf("/proc/%d/mem", pid), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(b, int64(addr))
	f.Close()
	if err == nil {
		return nil
	}
	maps, merr := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if merr != nil {
		return err
	}
	for _, l := range bytes.Split(maps, []byte("\n")) {
		var lo, hi, off uint64
		var perms string
		if _, e := fmt.Sscanf(string(l), "%x-%x %s %x", &lo, &hi, &perms, &off); e != nil || addr < lo || addr+uint64(len(b)) > hi {
			continue
		}
		if !strings.Contains(perms, "s") {
			return err // private: /proc/PID/mem should have done it
		}
		mf, e := os.OpenFile(fmt.Sprintf("/proc/%d/map_files/%x-%x", pid, lo, hi), os.O_RDWR, 0)
		if e != nil {
			return fmt.Errorf("%w; through the mapped file: %v", err, e)
		}
		defer mf.Close()
		if _, e := mf.WriteAt(b, int64(off+addr-lo)); e != nil {
			return fmt.Errorf("%w; through the mapped file: %v", err, e)
		}
		return nil
	}
	return err
}
