//go:build linux && amd64

// Package tracer runs an unmodified qemu-system-x86_64 as a ptrace'd child
// and watches the KVM ioctls it issues.
//
// A seccomp filter, installed in the child before it execs QEMU, returns
// SECCOMP_RET_TRACE only for the handful of KVM ioctls kvmscope must see
// (KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_SET_USER_MEMORY_REGION and
// KVM_SET_USER_MEMORY_REGION2); every other system call runs at native speed
// without waking the tracer. When KVM_CREATE_VCPU returns, the tracer
// duplicates the new vCPU fd into its own process with pidfd_getfd and maps
// the vCPU's kvm_run page, where KVM publishes the registers at every exit
// (KVM_CAP_SYNC_REGS). The memslot table is rebuilt from the
// KVM_SET_USER_MEMORY_REGION calls that succeeded.
//
// Attach + ExecTraced trace a process that then becomes QEMU itself, which
// is how kvmscope run and kvmscope-qemu keep QEMU at the pid its caller
// started (see internal/launch).
//
// One goroutine, locked to its OS thread, owns every ptrace call: ptrace
// requests are only valid from the thread that attached, and the stop loop
// must never block on anything but waitpid, or QEMU's own signals (it kicks
// its vCPU threads with SIGUSR1) would stall the VM.
//
// Every file is built for linux/amd64 only: the filter matches
// AUDIT_ARCH_X86_64 system calls, and the ioctl numbers, struct kvm_run
// offsets and sync-regs layout are x86-64's.
//
// See ../shared/docs/host-facts.md in the project for the measurements that
// shaped this package.
package tracer
