package launch

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// detachedEnv carries the status pipe's fd number to the detached tracer.
// An environment variable (not a flag) works for every entry point that
// re-executes itself with its own argv, kvmscope run and kvmscope-qemu
// alike; the detached tracer removes it before QEMU sees the environment.
const detachedEnv = "KVMSCOPE_DETACHED_STATUS_FD"

// statusUntraced is what a detached tracer reports when it could not trace
// QEMU and fail-open is set: the front process then runs QEMU itself.
const statusUntraced = "untraced"

// takeDetachedStatusFD returns the status pipe of a detached tracer (-1 in
// the front process) and removes the variable from our environment.
func takeDetachedStatusFD() (int, error) {
	s, ok := os.LookupEnv(detachedEnv)
	if !ok {
		return -1, nil
	}
	os.Unsetenv(detachedEnv)
	fd, err := strconv.Atoi(s)
	if err != nil || fd < 3 {
		return -1, fmt.Errorf("bad %s=%q", detachedEnv, s)
	}
	// Ours only: QEMU must not inherit it.
	unix.CloseOnExec(fd)
	return fd, nil
}

// runDetached handles QEMU's -daemonize. QEMU's first process exits as soon
// as its daemon child is ready, and its caller (libvirt) waits for exactly
// that. The daemon must stay traced, and a tracer cannot hand its tracees
// to another process, so the tracer itself runs detached: this process
// re-executes itself in a new session with a status pipe, and returns the
// exit status of QEMU's first process when the detached tracer reports it.
// It returns untraced=true when the detached tracer could not trace QEMU and
// fail-open asks this process to run QEMU itself.
func runDetached() (code int, untraced bool, err error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return 1, false, fmt.Errorf("status pipe: %w", err)
	}
	r, w := os.NewFile(uintptr(p[0]), "status-r"), p[1]
	defer r.Close()
	// The write end is the only fd we let the child inherit beyond the
	// caller's own; the child marks it close-on-exec again before QEMU runs.
	if _, err := unix.FcntlInt(uintptr(w), unix.F_SETFD, 0); err != nil {
		unix.Close(w)
		return 1, false, fmt.Errorf("status pipe: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		self = "/proc/self/exe"
	}
	env := append(os.Environ(), detachedEnv+"="+strconv.Itoa(w))
	_, err = syscall.ForkExec(self, os.Args, &syscall.ProcAttr{
		Env:   env,
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	unix.Close(w)
	if err != nil {
		return 1, false, fmt.Errorf("start detached tracer: %w", err)
	}
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		return 1, false, fmt.Errorf("the detached kvmscope tracer ended before QEMU daemonized")
	}
	line = strings.TrimSpace(line)
	if line == statusUntraced {
		return 0, true, nil
	}
	code, err = strconv.Atoi(line)
	if err != nil {
		return 1, false, fmt.Errorf("bad status from detached tracer: %q", line)
	}
	return code, false, nil
}

// reportStatus writes a detached tracer's answer to the front process.
func reportStatus(fd int, s string) {
	f := os.NewFile(uintptr(fd), "status")
	fmt.Fprintf(f, "%s\n", s)
	f.Close()
}
