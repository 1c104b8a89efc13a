// Package launch runs QEMU under kvmscope's tracer and serves the VM's API.
//
// It is the body shared by `kvmscope run -- QEMU ARGS...` and the libvirt
// emulator wrapper kvmscope-qemu: parsing just enough of QEMU's command line
// (-name, -daemonize, -accel, probe runs), the -daemonize hand-off to a
// detached tracer, signal forwarding, the API socket and event log, and the
// fail-open/fail-closed choice when the tracer cannot start. See
// docs/libvirt.md for how the wrapper uses it.
package launch
