package launch

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
)

// scanSource is the target's guest as the scanner sees it: whichever
// source is current (nothing until QEMU creates its VM or answers QMP,
// then KVM's or TCG's).
type scanSource struct{ r *runTarget }

func (s scanSource) ReadAt(p []byte, gpa int64) (int, error) { return s.r.Source().ReadAt(p, gpa) }
func (s scanSource) Regions() []guestmem.Region              { return s.r.Source().Regions() }
func (s scanSource) CPUs(ctx context.Context) ([]guestmem.CPU, error) {
	return s.r.Source().CPUs(ctx)
}

// newScanner returns the scanner that serves the guest kernel's objects.
func newScanner(r *runTarget) *introspect.Scanner {
	sc := introspect.NewScanner(scanSource{r})
	sc.Pause = r.pause
	return sc
}

// startScans scans every interval until the tracer is done, keeping the
// latest process table for the API (kvmscope run --scan-interval).
func startScans(r *runTarget, sc *introspect.Scanner, interval time.Duration, done <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-done; cancel() }()
	go sc.Run(ctx, interval, func(err error) {
		r.log.Debug().Err(err).Msg("scheduled scan")
	})
}

// pause freezes QEMU for a consistent scan: SIGSTOP stops every QEMU
// thread (the tracer sees the group-stop and leaves the threads stopped
// with PTRACE_LISTEN), so neither the vCPUs nor QEMU's device emulation
// change guest memory until SIGCONT. Guest time keeps running (unlike QMP
// stop, kvmclock is not frozen); scans take milliseconds.
func (r *runTarget) pause(ctx context.Context) (func(), error) {
	pid := r.t.QEMUPid()
	if pid == 0 {
		return nil, fmt.Errorf("QEMU is not running")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return nil, fmt.Errorf("stop QEMU: %w", err)
	}
	resume := func() { syscall.Kill(pid, syscall.SIGCONT) }
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
// t for a traced stop).
func allStopped(pid int) bool {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread exited
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 || i+2 >= len(s) {
			return false
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 7 {
			return false
		}
		// Kernel workers in QEMU's thread group (KVM's
		// kvm-nx-lpage-recovery, vhost) never stop for signals.
		if flags, _ := strconv.ParseUint(f[6], 10, 64); flags&pfUserWorker != 0 {
			continue
		}
		if st := f[0]; st != "t" && st != "T" {
			return false
		}
	}
	return true
}
