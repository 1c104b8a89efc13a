package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

// runDetached handles QEMU's -daemonize. QEMU's first process exits as soon
// as its daemon child is ready, and its caller (libvirt) waits for exactly
// that. The daemon must stay traced, and a tracer cannot hand its tracees
// to another process, so the tracer itself runs detached: this process
// re-executes kvmscope in a new session with a status pipe, and returns
// the exit status of QEMU's first process when the detached tracer reports
// it.
func runDetached(c *cli.Context, args []string) error {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return cli.Exit(fmt.Sprintf("status pipe: %v", err), 1)
	}
	r, w := os.NewFile(uintptr(p[0]), "status-r"), p[1]
	defer r.Close()
	// The write end is the only fd we let the child inherit beyond the
	// caller's own; the child marks it close-on-exec again before QEMU runs.
	if _, err := unix.FcntlInt(uintptr(w), unix.F_SETFD, 0); err != nil {
		return cli.Exit(fmt.Sprintf("status pipe: %v", err), 1)
	}
	argv := detachedArgv(os.Args, w)
	self, err := os.Executable()
	if err != nil {
		self = "/proc/self/exe"
	}
	_, err = syscall.ForkExec(self, argv, &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: []uintptr{0, 1, 2},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	unix.Close(w)
	if err != nil {
		return cli.Exit(fmt.Sprintf("start detached tracer: %v", err), 1)
	}
	line, err := bufio.NewReader(r).ReadString('\n')
	if err != nil {
		return cli.Exit("the detached kvmscope tracer ended before QEMU daemonized", 1)
	}
	code, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		return cli.Exit(fmt.Sprintf("bad status from detached tracer: %q", line), 1)
	}
	if code != 0 {
		return cli.Exit("", code)
	}
	return nil
}

// detachedArgv is our own argv with --detached-status-fd added to run.
func detachedArgv(argv []string, fd int) []string {
	out := make([]string, 0, len(argv)+1)
	added := false
	for _, a := range argv {
		out = append(out, a)
		if !added && a == "run" {
			out = append(out, "--detached-status-fd="+strconv.Itoa(fd))
			added = true
		}
	}
	return out
}
