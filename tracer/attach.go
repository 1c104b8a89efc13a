//go:build linux && amd64

package tracer

import (
	"fmt"
	"os"
	"runtime"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// Attach starts tracing the running process pid from this process, for
// the in-place launch: the process that was asked to run QEMU (libvirt's
// child) stays the process that runs QEMU, and a separate kvmscope process
// traces it. pid then calls ExecTraced. Only pid's thread-group leader is
// seized; its other threads vanish at execve.
func Attach(pid int, log zerolog.Logger, o Options) (*Tracer, error) {
	t := newTracer(log, o)
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer close(t.done)
		if err := seize(pid); err != nil {
			started <- fmt.Errorf("ptrace(PTRACE_SEIZE, %d): %w", pid, err)
			return
		}
		t.pid = pid
		t.threads[pid] = true
		t.tgids[pid] = pid
		t.procs = []int{pid}
		started <- nil
		t.err = t.loop()
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return t, nil
}

// ExecTraced installs the seccomp filter prog (from Filter, made by the
// tracer for its policy) on the calling thread and executes path with argv
// and the current environment. It returns only on failure. The process
// must already be traced (see Attach): without a tracer the trapped calls
// fail with ENOSYS, so the filter fails closed.
//
// Precondition: the calling goroutine is locked to the main thread, the
// thread-group leader the tracer seized.
func ExecTraced(path string, argv []string, prog []unix.SockFilter) error {
	if err := installFilter(prog); err != nil {
		return err
	}
	err := unix.Exec(path, argv, os.Environ())
	return fmt.Errorf("exec %s: %w", path, err)
}
