//go:build linux && amd64

package kvmprobe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kvmscope/kvmscope/tracer"
)

// The KVM ABI the probes need beyond the tracer's numbers
// (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
const (
	kvmSetGuestDebug      = 0x4048ae9b // _IOW(KVMIO, 0x9b, struct kvm_guest_debug), 72 bytes
	kvmGuestDbgEnable     = 1 << 0
	kvmGuestDbgSingleStep = 1 << 1
	kvmGuestDbgUseHWBP    = 1 << 17
	kvmExitDebug          = 4
	// ExitHLT and ExitIntr are KVM_EXIT_HLT and KVM_EXIT_INTR.
	ExitHLT  = 5
	ExitIntr = 10
	// offsetof(struct kvm_run, debug.arch): exception (u32), pad, pc, dr6, dr7.
	kvmRunDebugOffset = 32
)

// Base is where a Guest's code runs: the 64 KiB below 4 GiB, where a
// vCPU starts after reset in real mode (CS base 0xffff0000, IP 0xfff0).
// Code is placed at Base+CodeOffset and the reset vector jumps there.
const (
	Base       = 0xffff0000
	size       = 0x10000
	CodeOffset = 0xffd0
)

// Guest is a VM of one vCPU, in real mode at the reset vector, whose
// code (at most 32 bytes) was given to New.
type Guest struct {
	kvm, vm, vcpu int
	mem, run      []byte
}

// New creates the guest: /dev/kvm, a VM, 64 KiB of memory holding code
// and the jump to it, one vCPU and its kvm_run page.
func New(code []byte) (g *Guest, err error) {
	if len(code) > 0xfff0-CodeOffset {
		return nil, fmt.Errorf("kvmprobe: %d bytes of code, at most %d", len(code), 0xfff0-CodeOffset)
	}
	g = &Guest{kvm: -1, vm: -1, vcpu: -1}
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	if g.kvm, err = unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0); err != nil {
		return nil, err
	}
	vm, err := ioctl(g.kvm, tracer.KVMCreateVM, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	g.vm = int(vm)
	if g.mem, err = unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		return nil, err
	}
	copy(g.mem[CodeOffset:], code)
	copy(g.mem[0xfff0:], []byte{0xeb, byte(0x100 + CodeOffset - 0xfff2)}) // jmp CodeOffset (rel8)
	region := struct {
		slot, flags                   uint32
		guestPhys, memSize, userspace uint64
	}{0, 0, Base, size, uint64(uintptr(unsafe.Pointer(&g.mem[0])))}
	if _, err := ioctl(g.vm, tracer.KVMSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		return nil, fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	vcpu, err := ioctl(g.vm, tracer.KVMCreateVCPU, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	g.vcpu = int(vcpu)
	runSize, err := ioctl(g.kvm, tracer.KVMGetVCPUMmapSize, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	if g.run, err = unix.Mmap(g.vcpu, 0, int(runSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("mmap kvm_run: %w", err)
	}
	return g, nil
}

// Run enters the guest until it exits for a reason other than a signal
// (KVM_EXIT_INTR), and returns the exit reason.
func (g *Guest) Run() (uint32, error) {
	for {
		if _, err := ioctl(g.vcpu, tracer.KVMRun, 0); err != nil && !errors.Is(err, unix.EINTR) {
			return 0, fmt.Errorf("KVM_RUN: %w", err)
		}
		if r := binary.LittleEndian.Uint32(g.run[tracer.KVMRunExitReasonOffset:]); r != ExitIntr {
			return r, nil
		}
	}
}

// Close releases the guest.
func (g *Guest) Close() {
	if g.run != nil {
		unix.Munmap(g.run)
	}
	for _, fd := range []int{g.vcpu, g.vm, g.kvm} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
	if g.mem != nil {
		unix.Munmap(g.mem)
	}
}

// ErrNoStop is wrapped by GuestDebug's answer when the host's KVM took
// the breakpoint and did not stop at it, or refused to set it: the
// probe ran, and its answer is no. Any other error means the probe
// could not run (no /dev/kvm, no memory).
var ErrNoStop = errors.New("this KVM does not stop vCPUs at guest-debug breakpoints")

// GuestDebug reports whether this host's KVM stops a vCPU at a hardware
// instruction breakpoint set through KVM_SET_GUEST_DEBUG, as QEMU's
// gdbstub sets one (KVM_GUESTDBG_ENABLE|USE_HW_BP, DR0 the address, DR7
// 0x602: G0, execute, one byte), and then single-steps it
// (KVM_GUESTDBG_SINGLESTEP) one instruction on: nil when the vCPU exits
// with KVM_EXIT_DEBUG at the breakpoint and after the step at the next
// instruction, else why not. The guest is a countdown loop then hlt; the
// breakpoint is on the loop's first instruction.
func GuestDebug() error {
	g, err := New([]byte{
		0x66, 0xb9, 0x10, 0, 0, 0, // mov ecx, 16
		0x66, 0x49, // 1: dec ecx
		0x75, 0xfc, // jnz 1b
		0xf4, // hlt
	})
	if err != nil {
		return err
	}
	defer g.Close()
	const at = Base + CodeOffset + 6 // the dec
	var dbg [72]byte                 // struct kvm_guest_debug
	binary.LittleEndian.PutUint32(dbg[0:], kvmGuestDbgEnable|kvmGuestDbgUseHWBP)
	binary.LittleEndian.PutUint64(dbg[8:], at)        // debugreg[0]
	binary.LittleEndian.PutUint64(dbg[8+7*8:], 0x602) // debugreg[7]
	if _, err := ioctl(g.vcpu, kvmSetGuestDebug, uintptr(unsafe.Pointer(&dbg[0]))); err != nil {
		return fmt.Errorf("%w: KVM_SET_GUEST_DEBUG with a hardware breakpoint: %v", ErrNoStop, err)
	}
	reason, err := g.Run()
	if err != nil {
		return err
	}
	switch reason {
	case kvmExitDebug:
		if err := g.debugExit(at, "the breakpoint"); err != nil {
			return err
		}
	case ExitHLT:
		return fmt.Errorf("%w: a probe vCPU with a hardware breakpoint (KVM_SET_GUEST_DEBUG, DR0 %#x) ran past it to its hlt", ErrNoStop, at)
	default:
		return fmt.Errorf("%w: a probe vCPU with a hardware breakpoint exited for reason %d, not KVM_EXIT_DEBUG", ErrNoStop, reason)
	}
	// Then a step, as QEMU's gdbstub steps past a breakpoint it removed:
	// the dec runs and the vCPU stops at the jnz after it.
	clear(dbg[:])
	binary.LittleEndian.PutUint32(dbg[0:], kvmGuestDbgEnable|kvmGuestDbgSingleStep)
	if _, err := ioctl(g.vcpu, kvmSetGuestDebug, uintptr(unsafe.Pointer(&dbg[0]))); err != nil {
		return fmt.Errorf("%w: KVM_SET_GUEST_DEBUG to single-step: %v", ErrNoStop, err)
	}
	if reason, err = g.Run(); err != nil {
		return err
	}
	if reason != kvmExitDebug {
		return fmt.Errorf("%w: a single-stepped probe vCPU exited for reason %d, not KVM_EXIT_DEBUG", ErrNoStop, reason)
	}
	return g.debugExit(at+2, "the instruction after the one stepped")
}

// debugExit checks that the KVM_EXIT_DEBUG in kvm_run is a #DB at want.
func (g *Guest) debugExit(want uint64, what string) error {
	d := g.run[kvmRunDebugOffset:]
	if exc, pc := binary.LittleEndian.Uint32(d), binary.LittleEndian.Uint64(d[8:]); exc != 1 || pc != want {
		return fmt.Errorf("%w: KVM_EXIT_DEBUG for exception %d at %#x, want #DB at %s, %#x", ErrNoStop, exc, pc, what, want)
	}
	return nil
}

func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}
