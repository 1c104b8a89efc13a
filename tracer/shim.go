package tracer

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// ShimArg is the hidden first argument with which the kvmscope binary
// re-executes itself as the child that becomes QEMU. Go cannot run code
// between fork and exec, so the filter is installed by a tiny run of our own
// binary: install the seccomp filter, stop until the tracer has attached,
// then execve QEMU with the caller's argv and environment untouched.
const ShimArg = "__kvmscope-exec"

// RunShim is the body of the shim. args are: PATH ARGV0 ARGS...
// It never returns; on failure it prints one line and exits 127 like a
// shell does for a command it cannot run.
//
// Precondition: called from the main goroutine locked to the main thread
// (runtime.LockOSThread in an init function), so that the thread that stops
// for the tracer, installs the filter and calls execve is the thread-group
// leader the tracer seized.
func RunShim(args []string) {
	if len(args) < 2 {
		shimFail(fmt.Errorf("internal error: shim needs PATH and ARGV0"))
	}
	runtime.LockOSThread()
	prog, err := buildFilter(trappedIoctls)
	if err != nil {
		shimFail(err)
	}
	if err := installFilter(prog); err != nil {
		shimFail(err)
	}
	// Stop the whole process; the tracer waits for this stop, seizes us and
	// sends SIGCONT.
	if err := unix.Kill(os.Getpid(), unix.SIGSTOP); err != nil {
		shimFail(fmt.Errorf("stop for tracer: %w", err))
	}
	err = unix.Exec(args[0], args[1:], os.Environ())
	shimFail(fmt.Errorf("exec %s: %w", args[0], err))
}

func shimFail(err error) {
	fmt.Fprintf(os.Stderr, "kvmscope: %v\n", err)
	os.Exit(127)
}
