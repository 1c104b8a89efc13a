//go:build linux && amd64

package testenv

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmscope/kvmscope/tracer"
	"github.com/kvmscope/kvmscope/tracer/kvmprobe"
)

// The tracer's KVM ioctl numbers (defined once, in tracer/kvm.go), and the
// API version (include/uapi/linux/kvm.h). The probes' guests are
// tracer/kvmprobe's.
const (
	kvmGetAPIVersion = tracer.KVMGetAPIVersion
	kvmCreateVM      = tracer.KVMCreateVM
	kvmAPIVersion    = 12
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
	g, err := kvmprobe.New([]byte{
		0x66, 0xb9, probeLoops & 0xff, probeLoops >> 8 & 0xff, probeLoops >> 16 & 0xff, 0, // mov ecx, probeLoops
		0x66, 0x49, // 1: dec ecx
		0x75, 0xfc, // jnz 1b
		0xf4, // hlt
	})
	if err != nil {
		return 0, err
	}
	defer g.Close()
	start := time.Now()
	reason, err := g.Run()
	if err != nil {
		return 0, err
	}
	if reason != kvmprobe.ExitHLT {
		return 0, fmt.Errorf("KVM_RUN: exit reason %d, want hlt", reason)
	}
	return time.Since(start), nil
}

// guestDebug is the check of GuestDebug (kvmprobe.GuestDebug).
func guestDebug() error {
	if err := kvmUsable(); err != nil {
		return err
	}
	return kvmprobe.GuestDebug()
}

func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}
