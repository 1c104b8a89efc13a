// Package handoff splits kvmscope's hold on a VM into two processes, so that
// a crash in the part that parses guest memory never takes the VM down.
//
// The keeper is the tracer's process: it holds QEMU's ptrace (with
// PTRACE_O_EXITKILL, so QEMU cannot outlive its policy), the seccomp
// filter's counterpart, the vCPU handles (kvm_run mappings) and the guard.
// It parses no guest kernel data. The analysis process (session, rules,
// API) reads guest memory from QEMU's address space itself and asks the
// keeper, over a unix socket, for everything only the tracer can do:
// fresh registers (copied at the vCPU's stop), MSRs, pausing QEMU, the
// guard, and the tracer's events. When the analysis process dies, the
// keeper releases every pause it held, keeps the tracer's events queued
// and starts a new one; QEMU never notices (docs/how-it-works.md).
//
// The protocol is net/rpc (gob) over the socket: Serve on the keeper's
// end, Dial on the analysis process's.
package handoff
