// Package testlinux boots real Linux guests under QEMU (TCG) for kvmscope's
// tests: the kernels and busybox initramfs that scripts/fetch-guests.sh
// (`just guests`) puts in .cache/guests, driven over QMP (guestmem/qmp).
//
// The guests' /init (scripts/initramfs/init) starts a known set of
// processes and prints the guest's own view of them on the serial console;
// Guest.PS and Guest.Kallsyms return that view, the ground truth that
// introspection from outside is checked against.
package testlinux

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/kvmscope/kvmscope/internal/testenv"
)

// Paths are the files scripts/fetch-guests.sh fetches.
type Paths struct {
	Dir string
	// Debian's linux-image-6.1.*-cloud-amd64: BTF, KASLR, PTI, 5-level
	// paging capable.
	DebianKernel string
	// DebianSystemMap and DebianConfig belong to DebianKernel. Tests may
	// use them to cross-check; kvmscope itself must never need them.
	DebianSystemMap string
	DebianConfig    string
	// GokrazyKernel is github.com/gokrazy/kernel.amd64: Linux 7.x, no BTF.
	GokrazyKernel string
	// Initrd is the busybox initramfs with scripts/initramfs/init.
	Initrd string
}

// Guests locates the fetched guest files: in $KVMSCOPE_GUESTS when set,
// else in .cache/guests at the repository root. It fails, telling to run
// `just guests`, when any is missing.
func Guests() (Paths, error) {
	dir := os.Getenv("KVMSCOPE_GUESTS")
	if dir == "" {
		_, file, _, ok := runtime.Caller(0)
		if !ok {
			return Paths{}, errors.New("testlinux: cannot locate the repository (runtime.Caller failed); set KVMSCOPE_GUESTS")
		}
		// This file is internal/testlinux/guests.go.
		dir = filepath.Join(filepath.Dir(file), "..", "..", ".cache", "guests")
	}
	dir = filepath.Clean(dir)
	p := Paths{
		Dir:             dir,
		DebianKernel:    filepath.Join(dir, "debian", "vmlinuz"),
		DebianSystemMap: filepath.Join(dir, "debian", "System.map"),
		DebianConfig:    filepath.Join(dir, "debian", "config"),
		GokrazyKernel:   filepath.Join(dir, "gokrazy", "vmlinuz"),
		Initrd:          filepath.Join(dir, "initramfs.cpio.gz"),
	}
	for _, f := range []string{p.DebianKernel, p.DebianSystemMap, p.DebianConfig, p.GokrazyKernel, p.Initrd} {
		if st, err := os.Stat(f); err != nil || st.Size() == 0 {
			return p, fmt.Errorf("test guest file %s missing: run `just guests` (scripts/fetch-guests.sh)", f)
		}
	}
	return p, nil
}

// Guests is the gate's check of testenv.Guests.
func init() {
	testenv.RegisterCheck(testenv.Guests, func() error { _, err := Guests(); return err })
}

// Require returns the guest paths; the gate (internal/testenv) skips the
// test, and records why, when the guests have not been fetched or QEMU is
// not installed.
func Require(t testing.TB) Paths {
	t.Helper()
	testenv.Require(t, testenv.QEMU, testenv.Guests)
	p, _ := Guests() // the gate checked it
	return p
}
