// Package policy is kvmscope's ioctl policy: a YAML file of ordered rules
// that decide, from each ioctl's request, fd, thread and decoded argument
// fields, whether QEMU may perform it (docs/policy.md).
//
// The package parses and checks policy files (errors carry the file's line
// and column), decides single calls, plans which requests must stop in the
// tracer at all (the rest are allowed by the seccomp filter without waking
// it), and learns a policy from the calls a VM made. It knows nothing of
// ptrace: the tracer hands it a Call and carries out the Decision.
package policy
