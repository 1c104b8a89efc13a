package session

import (
	"context"
	"errors"

	"github.com/kvmscope/kvmscope/guestmem"
)

// Machine is the tracer side of a session: whatever holds handles on one
// VM.
type Machine interface {
	// Source returns the guest's memory and registers as they can be read
	// now, or why they cannot be read yet (QEMU has not created its VM).
	Source() (guestmem.Source, error)
	// Pause freezes the guest, vCPUs and devices, so that nothing changes
	// its memory until resume is called. A Machine that cannot pause
	// returns an error wrapping ErrNoPause.
	Pause(ctx context.Context) (resume func(), err error)
}

// ErrNoPause is wrapped by Machines that cannot pause their guest.
var ErrNoPause = errors.New("this VM cannot be paused")

// Frozen is the Machine of a guest that never changes, such as an ELF
// core: pausing it is a no-op, and every scan of it is consistent.
type Frozen struct{ Src guestmem.Source }

// Source returns the frozen source.
func (f Frozen) Source() (guestmem.Source, error) { return f.Src, nil }

// Pause does nothing: the guest cannot change.
func (Frozen) Pause(context.Context) (func(), error) { return func() {}, nil }
