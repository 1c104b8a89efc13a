package tracer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Pause freezes QEMU for a consistent read of its guest: SIGSTOP stops
// every QEMU thread, and the tracer, seeing each thread's group-stop,
// leaves it stopped with PTRACE_LISTEN (stopped in tracer.go), so neither
// the vCPUs nor QEMU's device emulation change guest memory until resume
// sends SIGCONT. Guest time keeps running (unlike QMP stop, kvmclock is
// not frozen); callers hold the pause for milliseconds.
func (t *Tracer) Pause(ctx context.Context) (resume func(), err error) {
	pid := t.QEMUPid()
	if pid == 0 {
		return nil, fmt.Errorf("QEMU is not running")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return nil, fmt.Errorf("stop QEMU: %w", err)
	}
	resume = func() { syscall.Kill(pid, syscall.SIGCONT) }
	deadline := time.Now().Add(2 * time.Second)
	for !allStopped(pid) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			resume()
			return nil, fmt.Errorf("QEMU's threads did not all stop within 2s")
		}
		time.Sleep(200 * time.Microsecond)
	}
	return resume, nil
}

// pfUserWorker is PF_USER_WORKER (include/linux/sched.h): a kernel
// thread that lives in a user process's thread group.
const pfUserWorker = 0x00004000

// allStopped reports whether every thread of pid is stopped (state T, or
// t for a traced stop), per /proc/PID/task/TID/stat.
func allStopped(pid int) bool {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, f := range tasks {
		stopped, worker, ok := taskStopped(f)
		if !ok {
			continue // the thread exited
		}
		// Kernel workers in QEMU's thread group (KVM's
		// kvm-nx-lpage-recovery, vhost) never stop for signals.
		if !stopped && !worker {
			return false
		}
	}
	return true
}

// taskStopped reads a /proc/PID/task/TID/stat: whether the thread is
// stopped (state T or t), whether it is a kernel worker, and whether the
// file could be read (false: the thread exited).
func taskStopped(stat string) (stopped, worker, ok bool) {
	b, err := os.ReadFile(stat)
	if err != nil {
		return false, false, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return false, false, true
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 7 {
		return false, false, true
	}
	flags, _ := strconv.ParseUint(f[6], 10, 64)
	return f[0] == "t" || f[0] == "T", flags&pfUserWorker != 0, true
}
