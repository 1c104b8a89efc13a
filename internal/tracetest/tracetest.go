//go:build linux && amd64

// Package tracetest traces a process from a test the way internal/launch
// does: a child (the test binary re-executed) waits until the test has
// attached to it with tracer.Attach, then becomes the traced program with
// tracer.ExecTraced. A test package calls Child from an init function, and
// Start from its tests.
//
// While a traced child runs, the test process must start no other child:
// the tracer's waitpid(-1) would reap it.
package tracetest

import (
	"fmt"
	"os"
	"runtime"
	"syscall"

	"github.com/kvmscope/kvmscope/tracer"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

const childEnv = "KVMSCOPE_TEST_EXEC_TRACED"

// Child is the child's body, when this process is one: argv[1] is the
// program's path, argv[2:] its argv (argv[0] included), fd 3 the pipe on
// which the test says it has attached. Call it from an init function: it
// must run on the main thread (the thread-group leader the tracer
// seized), as ExecTraced requires. It returns at once in the test itself.
func Child() {
	if os.Getenv(childEnv) == "" {
		return
	}
	runtime.LockOSThread()
	os.Unsetenv(childEnv)
	var b [1]byte
	if n, _ := os.NewFile(3, "attached").Read(b[:]); n != 1 {
		// The test could not attach and closed the pipe.
		os.Exit(126)
	}
	prog, err := tracer.Filter(nil)
	if err == nil {
		err = tracer.ExecTraced(os.Args[1], os.Args[2:], prog)
	}
	fmt.Fprintf(os.Stderr, "%v\n", err)
	os.Exit(127)
}

// Start starts path (argv) in a child of the test process and traces it
// from here.
func Start(path string, argv []string, opts tracer.Options) (*tracer.Tracer, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer w.Close()
	pid, err := syscall.ForkExec(self, append([]string{self, path}, argv...), &syscall.ProcAttr{
		Env:   append(os.Environ(), childEnv+"=1"),
		Files: []uintptr{0, 1, 2, r.Fd()},
	})
	r.Close()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", self, err)
	}
	tr, err := tracer.Attach(pid, zerolog.Nop(), opts)
	if err != nil {
		w.Close()
		unix.Wait4(pid, nil, 0, nil)
		return nil, err
	}
	if _, err := w.Write([]byte{1}); err != nil {
		tr.Signal(syscall.SIGKILL)
		<-tr.Done()
		return nil, fmt.Errorf("resume the traced child: %w", err)
	}
	return tr, nil
}
