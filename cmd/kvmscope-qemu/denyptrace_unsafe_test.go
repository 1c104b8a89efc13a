package main

import (
	"fmt"
	"os"
	"os/exec"
	"unsafe"

	"golang.org/x/sys/unix"
)

// denyPtraceEnv makes the test binary a launcher that forbids ptrace to
// what it executes, as a container runtime's seccomp profile can: a real
// way for kvmscope's tracer to be refused.
const denyPtraceEnv = "KVMSCOPE_TEST_DENY_PTRACE"

// denyPtraceAndExec installs a seccomp filter on every thread that makes
// ptrace(2) fail with EPERM, then executes args.
func denyPtraceAndExec(args []string) {
	const (
		auditArchX8664 = 0xc000003e // include/uapi/linux/audit.h
		offNR          = 0          // struct seccomp_data.nr
		offArch        = 4          // struct seccomp_data.arch
	)
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offArch},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 3, K: auditArchX8664},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offNR},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: unix.SYS_PTRACE},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	fail := func(err error) {
		fmt.Fprintf(os.Stderr, "deny-ptrace launcher: %v\n", err)
		os.Exit(126)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fail(err)
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog))); errno != 0 {
		fail(fmt.Errorf("seccomp: %w", errno))
	}
	os.Unsetenv(denyPtraceEnv)
	path, err := exec.LookPath(args[0])
	if err != nil {
		fail(err)
	}
	fail(unix.Exec(path, args, os.Environ()))
}
