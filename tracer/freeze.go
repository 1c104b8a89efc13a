//go:build linux && amd64

package tracer

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Freezing. A trapped ioctl's pointer argument lives in QEMU's memory,
// which QEMU's other threads (and a guest, if the pointer aims into guest
// RAM) can change between the tracer's read and the kernel's. So before
// the first read the tracer stops every other thread of the process with
// PTRACE_INTERRUPT, and lets them go only when the call has returned (or
// was failed): what the policy and the memslot table saw is what the
// kernel used. The stops the frozen threads reported are held and handled
// in order once the call is over.
//
// Kernel workers in QEMU's thread group (vhost, kvm-nx-lpage-recovery)
// are not traced and do not stop; docs/policy.md says what that leaves.

// heldStop is a stop a frozen thread reported, not yet handled.
type heldStop struct {
	tid int
	ws  unix.WaitStatus
}

// freeze stops every traced thread of process pid but tid, once per call.
func (t *Tracer) freeze(tid, pid int) error {
	if t.frozen == tid {
		return nil
	}
	if t.frozen != 0 {
		return fmt.Errorf("tracer: freeze for %d while frozen for %d", tid, t.frozen)
	}
	t.frozen = tid
	t.freezes++
	var others []int
	for o := range t.threads {
		if o != tid && t.tgids[o] == pid && !t.isHeld(o) {
			if err := interrupt(o); err == nil {
				others = append(others, o)
			} else if !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("freeze QEMU: PTRACE_INTERRUPT(%d): %w", o, err)
			}
		}
	}
	for _, o := range others {
		var ws unix.WaitStatus
		for {
			_, err := unix.Wait4(o, &ws, unix.WALL, nil)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return fmt.Errorf("freeze QEMU: wait for %d: %w", o, err)
			}
			break
		}
		if ws.Exited() || ws.Signaled() {
			t.exited(o, ws)
			continue
		}
		t.held = append(t.held, heldStop{o, ws})
	}
	return nil
}

func (t *Tracer) isHeld(tid int) bool {
	for _, h := range t.held {
		if h.tid == tid {
			return true
		}
	}
	return false
}

// thaw ends a freeze: the held stops are handled by the loop from now on.
func (t *Tracer) thaw(tid int) {
	if t.frozen == tid {
		t.frozen = 0
	}
}
