// Package kvmprobe runs throw-away one-vCPU KVM guests in this process to
// find out what the host's KVM does: how fast it runs guest code
// (internal/testenv's speed probe) and whether it stops a vCPU at a
// hardware breakpoint set with KVM_SET_GUEST_DEBUG, which QEMU's gdbstub
// relies on for actions inside a guest (GuestDebug). It needs /dev/kvm,
// and imports nothing of kvmscope's but the tracer's KVM numbers.
package kvmprobe
