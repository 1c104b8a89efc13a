//go:build linux && amd64

package tracer

import (
	"fmt"
	"os"
	"strconv"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
	"github.com/kvmscope/kvmscope/tracer/policy"
	"golang.org/x/sys/unix"
)

// call is one trapped ioctl, from its seccomp stop to its syscall-exit
// stop. Its argument is decoded at most once, and the first read of QEMU's
// memory freezes QEMU's other threads until the call returns (freeze.go),
// so what the handlers read is what the kernel reads.
type call struct {
	t        *Tracer
	tid, pid int // the calling thread and its process
	fd       int
	cmd      uint32
	arg      uint64
	req      *ioctl.Request // nil for a request the catalogue does not know

	args    *ioctl.Args
	argsErr error
	decoded bool
	skipped bool // a handler's skip verdict: the kernel did not run it
	link    string
	linkErr error
	linked  bool
}

func (c *call) name() string { return ioctl.Name(c.cmd) }

// decode returns the decoded argument, reading QEMU's memory once.
func (c *call) decode() (*ioctl.Args, error) {
	if !c.decoded {
		c.decoded = true
		a, err := c.req.Decode(c.arg, c)
		if err != nil {
			c.argsErr = err
		} else {
			c.args = &a
		}
	}
	return c.args, c.argsErr
}

// ReadAt reads QEMU's memory for the decoders, after freezing the other
// threads of the process.
func (c *call) ReadAt(b []byte, addr uint64) error {
	if len(b) == 0 {
		return nil
	}
	if err := c.t.freeze(c.tid, c.pid); err != nil {
		return err
	}
	return readTask(c.pid, addr, b)
}

// fdLink resolves the fd as /proc/PID/fd shows it.
func (c *call) fdLink() (string, error) {
	if !c.linked {
		c.linked = true
		c.link, c.linkErr = os.Readlink("/proc/" + strconv.Itoa(c.pid) + "/fd/" + strconv.Itoa(c.fd))
		if c.linkErr != nil {
			c.linkErr = fmt.Errorf("fd %d: %w", c.fd, c.linkErr)
		}
	}
	return c.link, c.linkErr
}

// thread is the kind of the calling thread, for thread: in rules.
func (c *call) thread() policy.Thread {
	switch {
	case c.t.vm.isVCPUThread(c.tid):
		return policy.ThreadVCPU
	case c.tid == c.pid:
		return policy.ThreadMain
	}
	return policy.ThreadIO
}

// policyCall is the call as the policy sees it.
func (c *call) policyCall() *policy.Call {
	return &policy.Call{Cmd: c.cmd, Arg: c.arg, Thread: c.thread(), FD: c.fdLink, Args: c.decode}
}

// verdict is a handler's answer at syscall entry.
type verdict struct {
	deny  bool
	errno unix.Errno
	// kill ends QEMU, with this reason.
	kill string
	// exit asks for the call's result: the handler's exit runs at the
	// syscall-exit stop.
	exit bool
	// skip, with exit, keeps the kernel from running the call: the
	// handler runs it itself at the exit stop and sets its result.
	skip bool
}

// A handler takes part in deciding and following trapped ioctls: the
// policy, vCPU capture and memslot bookkeeping are handlers. Handlers run
// in order at the seccomp stop; the first verdict that denies or kills
// decides, and later handlers do not see the call. A handler that panics
// denies the call (the tracer fails closed).
type handler interface {
	enter(c *call) verdict
	// exit sees the result of a call every handler allowed and this one
	// asked to follow: ret is the return value, or -errno when failed.
	exit(c *call, ret int64, failed bool)
}
