package session

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/tracer"
)

// RegisterWrite is one write of a vCPU's registers from the host, as its
// event (kind "register_write") records it: the registers written, before
// and after (hex), how, and what a fresh read showed once the guest ran
// again.
type RegisterWrite struct {
	VCPU int               `json:"vcpu"`
	Old  map[string]string `json:"old"`
	New  map[string]string `json:"new"`
	// Via is how: "sync_regs" (general registers, through kvm_run) or
	// "KVM_SET_MSRS" (MSRs, the ioctl run as QEMU).
	Via string `json:"via"`
	// Pauses is how many times the VM was paused for the write: more
	// than one when the vCPU was in the middle of an I/O exit, or QEMU
	// held a copy of an MSR written.
	Pauses   int               `json:"pauses"`
	Readback *RegisterReadback `json:"readback,omitempty"`
}

// RegisterReadback is a fresh read of the vCPU's registers after the
// guest resumed. The write itself is verified before the guest resumes
// (kvm_run holds exactly the new values, which KVM loads at the vCPU's
// next entry); this read can show that KVM loaded them only for registers
// the guest has not changed since, and cannot tell a register the guest
// changed from a write KVM dropped: RIP and RFLAGS move as soon as the
// guest runs.
type RegisterReadback struct {
	// Fresh: the vCPU left the guest to answer (else the values are those
	// it last stored, and prove nothing).
	Fresh bool `json:"fresh"`
	// Held are the registers written that read back as written.
	Held []string `json:"held,omitempty"`
	// Changed are the registers written that read otherwise, with the
	// value read.
	Changed map[string]string `json:"changed,omitempty"`
	// Error is why there was no read (e.g. the guest made QEMU exit).
	Error string `json:"error,omitempty"`
}

// ErrMixedRegisters is a write of general registers and MSRs at once.
var ErrMixedRegisters = errors.New("write general registers and MSRs in separate requests: they are written two ways (kvm_run sync regs, KVM_SET_MSRS), and one request is one verified write")

// ErrNoRegisterWrites is returned for a VM whose registers cannot be
// written.
var ErrNoRegisterWrites = errors.New("this VM's registers cannot be written: register writes need KVM under kvmscope run or attach --ptrace (not TCG, a read-only attach or a dump)")

// busyRetries bounds the pauses a register write makes while the vCPU
// keeps stopping in an exit QEMU has not completed (tracer.ErrVCPUBusy).
const busyRetries = 20

// WriteRegisters sets registers of vCPU vcpu (names as
// guestmem.RegisterNames or guestmem.MSRNames, not both), verifies that
// what the vCPU will load is what was asked (else puts the old values
// back), lets the guest run, reads the registers back fresh, and records
// the write as a register_write event (with SetEvents). General registers
// are written with the guest paused; MSRs with every QEMU thread frozen
// by the tracer, which runs KVM_SET_MSRS as QEMU.
func (s *Session) WriteRegisters(ctx context.Context, vcpu int, set map[string]uint64) (RegisterWrite, error) {
	src, err := s.machine.Source()
	if err != nil {
		return RegisterWrite{}, err
	}
	rw, ok := src.(guestmem.RegisterWriter)
	if !ok {
		return RegisterWrite{}, ErrNoRegisterWrites
	}
	if w, ok := src.(guestmem.Writer); ok && !guestmem.Writable(w) {
		// The same --allow-write as memory writes; refused before the
		// pause.
		return RegisterWrite{}, guestmem.ErrReadOnlyRegisters
	}
	if err := guestmem.CheckRegisterNames(set); err != nil {
		return RegisterWrite{}, err
	}
	general, msrs := guestmem.SplitRegisters(set)
	w := RegisterWrite{VCPU: vcpu, Via: "sync_regs"}
	var old, new map[string]uint64
	switch mw, isMSRW := src.(guestmem.MSRWriter); {
	case len(general) > 0 && len(msrs) > 0:
		return RegisterWrite{}, ErrMixedRegisters
	case len(msrs) > 0 && !isMSRW:
		return RegisterWrite{}, ErrNoRegisterWrites
	case len(msrs) > 0:
		w.Via = "KVM_SET_MSRS"
		w.Pauses, err = retryBusy(ctx, func() error {
			// No pause (QEMU is frozen by the tracer for the write),
			// but the same exclusion with actions.
			done, err := s.beginWrite()
			if err != nil {
				return err
			}
			defer done()
			old, new, err = mw.SetMSRs(ctx, vcpu, msrs)
			return err
		})
	default:
		w.Pauses, err = retryBusy(ctx, func() error {
			old, new, err = s.setPaused(ctx, rw, vcpu, general)
			return err
		})
	}
	if err != nil {
		return RegisterWrite{}, err
	}
	w.Old, w.New, w.Readback = hexRegs(old), hexRegs(new), readBack(ctx, src, vcpu, set, len(msrs) > 0)
	s.record("register_write", w)
	return w, nil
}

// retryBusy runs write until it does not fail with tracer.ErrVCPUBusy,
// at most busyRetries+1 times, and says how many times it ran. Between
// tries the guest runs: QEMU completes the exit, or writes back its
// copy of the vCPU's state.
func retryBusy(ctx context.Context, write func() error) (int, error) {
	for tries := 1; ; tries++ {
		err := write()
		if !errors.Is(err, tracer.ErrVCPUBusy) || tries > busyRetries {
			return tries, err
		}
		select {
		case <-ctx.Done():
			return tries, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// setPaused is one attempt of WriteRegisters: pause, write, check what
// the vCPU will load, resume.
func (s *Session) setPaused(ctx context.Context, rw guestmem.RegisterWriter, vcpu int, set map[string]uint64) (old, new map[string]uint64, err error) {
	resume, err := s.pauseForWrite(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer resume()
	old, new, err = rw.SetRegisters(ctx, vcpu, set)
	if err != nil {
		return nil, nil, err
	}
	for name, v := range set {
		if new[name] != v {
			rw.SetRegisters(ctx, vcpu, old)
			return nil, nil, fmt.Errorf("%w: %s would load as %#x, not %#x", ErrVerify, name, new[name], v)
		}
	}
	return old, new, nil
}

// readBack reads vCPU vcpu's registers fresh, after the write, and
// compares those written. For MSRs the general registers are read first:
// a fresh read means the vCPU left KVM_RUN to answer, so it ran again
// after the write, and any copy QEMU put back before that is in what
// KVM_GET_MSRS then shows.
func readBack(ctx context.Context, src guestmem.Source, vcpu int, set map[string]uint64, msrs bool) *RegisterReadback {
	rr, ok := src.(guestmem.RegisterReader)
	if !ok {
		return nil
	}
	regs, fresh, err := rr.GeneralRegisters(ctx, vcpu)
	if err == nil && msrs {
		regs, err = src.(guestmem.MSRWriter).ReadNamedMSRs(ctx, vcpu, slices.Sorted(maps.Keys(set)))
	}
	if err != nil {
		return &RegisterReadback{Error: err.Error()}
	}
	b := &RegisterReadback{Fresh: fresh}
	for name, v := range set {
		if regs[name] == v {
			b.Held = append(b.Held, name)
			continue
		}
		if b.Changed == nil {
			b.Changed = map[string]string{}
		}
		b.Changed[name] = fmt.Sprintf("%#x", regs[name])
	}
	slices.Sort(b.Held)
	return b
}

func hexRegs(m map[string]uint64) map[string]string {
	out := make(map[string]string, len(m))
	for name, v := range m {
		out[name] = fmt.Sprintf("%#x", v)
	}
	return out
}
