// Package ioctl names the ioctl requests QEMU issues (KVM's, and the
// terminal, tap, vhost and block requests around them) and decodes the
// arguments of the KVM requests a policy can look at.
//
// A request is its 32-bit number (include/uapi/asm-generic/ioctl.h: dir,
// size, type, nr) and, for the KVM requests, the kind of fd it is issued on
// (the /dev/kvm fd, a VM fd, a vCPU fd or a device fd) and the fields of its
// argument, in the kernel's own names (include/uapi/linux/kvm.h and
// arch/x86/include/uapi/asm/kvm.h). Fields read through a pointer come from
// the caller's memory, which a hostile QEMU controls: every decoder is
// bounded and returns an error, never a panic, and each has a fuzz target.
//
// The package is pure Go and builds everywhere; the tracer gives it QEMU's
// memory through Memory.
package ioctl
