package guestmem

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// resident reports whether the page at b (one page of a file mapping) is
// in the file's page cache, per mincore(2), which faults nothing in.
func resident(b []byte) bool {
	var vec byte
	_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec)))
	return errno == 0 && vec&1 != 0
}
