package session

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
	"github.com/kvmscope/kvmscope/tracer"
)

// The dispatch guard, session side: which guest pages to protect (the
// kernel's dispatch, found by introspection, or ranges the user names),
// and what a blocked store was, in the guest's terms. The blocking itself
// is the tracer's (tracer/guard.go).

// Guarder is a Machine that can make guest pages read-only for the guest
// (a KVM VM under the tracer).
type Guarder interface {
	Protect(ctx context.Context, ranges []tracer.GuardRange, opts tracer.GuardOptions) (tracer.GuardStatus, error)
	GuardStatus() tracer.GuardStatus
}

// ErrNoGuard is returned for a VM whose guest writes cannot be blocked.
var ErrNoGuard = errors.New("this VM cannot block guest writes: the guard needs KVM under kvmscope (under TCG and in dumps kvmscope detects and restores only)")

// guardState is what the session keeps of the guard.
type guardState struct {
	mu       sync.Mutex
	dispatch *introspect.Dispatch // read when the dispatch was protected
	kernel   *introspect.Kernel   // the kernel it belongs to
	targets  []GuardTarget
	notes    []string
}

// GuardTarget is one protected kernel object.
type GuardTarget struct {
	// What is the table or function, e.g. "sys_call_table".
	What string `json:"what"`
	VA   string `json:"va"`
	Size uint64 `json:"size"`
}

// Guard is the guard's state, as the API and CLI show it.
type Guard struct {
	tracer.GuardStatus
	Targets []GuardTarget `json:"targets,omitempty"`
	Notes   []string      `json:"notes,omitempty"`
}

func (s *Session) guarder() (Guarder, error) {
	g, ok := s.machine.(Guarder)
	if !ok {
		return nil, ErrNoGuard
	}
	if src, err := s.machine.Source(); err != nil {
		return nil, err
	} else if _, live := src.(*guestmem.Live); !live {
		return nil, ErrNoGuard
	}
	return g, nil
}

// Guard protects ranges of guest-physical memory (replacing what was
// protected; none unprotects).
func (s *Session) Guard(ctx context.Context, ranges []tracer.GuardRange) (*Guard, error) {
	g, err := s.guarder()
	if err != nil {
		return nil, err
	}
	st, err := g.Protect(ctx, ranges, tracer.GuardOptions{})
	s.guard.mu.Lock()
	s.guard.dispatch, s.guard.kernel, s.guard.targets, s.guard.notes = nil, nil, nil, nil
	s.guard.mu.Unlock()
	return &Guard{GuardStatus: st}, err
}

// GuardDispatch protects the guest kernel's system-call dispatch: the
// pages of sys_call_table & co. and of x64_sys_call & co. (the functions
// 6.9+ kernels dispatch through). The entry code is left out: the
// kernel patches code near it at run time (static keys), and a blocked
// text_poke is a BUG() in the guest.
func (s *Session) GuardDispatch(ctx context.Context) (*Guard, error) {
	g, err := s.guarder()
	if err != nil {
		return nil, err
	}
	var d *introspect.Dispatch
	var kern *introspect.Kernel
	var ranges []tracer.GuardRange
	var targets []GuardTarget
	var opts tracer.GuardOptions
	var notes []string
	_, err = s.scan(ctx, "guard", true, func(k *introspect.Kernel, off *introspect.Offsets) error {
		var err error
		kern = k
		// The kernel's own text patching of the pages (a jump label of a
		// neighbouring function) must land: text_poke BUG()s otherwise.
		if opts.PatchCR3, err = k.PokingPGD(off); err != nil {
			notes = append(notes, fmt.Sprintf("the kernel's own text patching of the guarded pages will be blocked too (poking_mm not found: %v)", err))
		}
		if d, err = k.ReadDispatch(0); err != nil {
			return err
		}
		add := func(what string, va, size uint64) error {
			targets = append(targets, GuardTarget{What: what, VA: fmt.Sprintf("%#x", va), Size: size})
			for p := va &^ 0xfff; p < va+size; p += 4096 {
				pa, err := k.VirtToPhys(p)
				if err != nil {
					return fmt.Errorf("%s: page %#x: %w", what, p, err)
				}
				ranges = append(ranges, tracer.GuardRange{GPA: pa &^ 0xfff, Size: 4096})
			}
			return nil
		}
		for _, t := range d.Tables {
			if err := add(t.Name, t.Addr, 8*uint64(len(t.Entries))); err != nil {
				return err
			}
		}
		for _, f := range d.Functions {
			if strings.HasSuffix(f.Name, "_sys_call") {
				if err := add(f.Name, f.Addr, f.Size); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("find the dispatch to protect: %w", err)
	}
	if len(ranges) == 0 {
		return nil, errors.New("the guest kernel has no system-call table or dispatch function to protect")
	}
	st, err := g.Protect(ctx, ranges, opts)
	s.guard.mu.Lock()
	s.guard.dispatch, s.guard.kernel, s.guard.targets, s.guard.notes = d, kern, targets, notes
	s.guard.mu.Unlock()
	return &Guard{GuardStatus: st, Targets: targets, Notes: notes}, err
}

// GuardStatus reports what is protected.
func (s *Session) GuardStatus() (*Guard, error) {
	g, err := s.guarder()
	if err != nil {
		return nil, err
	}
	s.guard.mu.Lock()
	defer s.guard.mu.Unlock()
	return &Guard{GuardStatus: g.GuardStatus(), Targets: s.guard.targets, Notes: s.guard.notes}, nil
}

// BlockedWrite is one blocked store as the blocked-write log holds it
// (NAME.blocked.jsonl, GET /v1/integrity/blocked, kvmscope blocked).
type BlockedWrite struct {
	// At is when the store faulted (the log line's time is when it was logged).
	At time.Time `json:"at"`
	// Source is "guest" (a vCPU's store) or "qemu" (QEMU's own access,
	// device DMA).
	Source string `json:"source"`
	VCPU   *int   `json:"vcpu,omitempty"`
	GPA    string `json:"gpa"`
	// GVA is the virtual address the guest stored to (from its store
	// instruction and registers), "" when not found.
	GVA string `json:"gva,omitempty"`
	// Bytes are what the store would have written, hex.
	Bytes string `json:"bytes"`
	Len   int    `json:"len"`
	// Target names what the store aimed at: "sys_call_table[62]",
	// "x64_sys_call+0x1a3", "" for ranges the user named.
	Target string `json:"target,omitempty"`
	// RIP is the guest's store instruction, RIPSymbol its symbol;
	// NextRIP is where the guest went on.
	RIP       string `json:"rip,omitempty"`
	RIPSymbol string `json:"rip_symbol,omitempty"`
	Insn      string `json:"insn,omitempty"`
	NextRIP   string `json:"next_rip,omitempty"`
	TID       int    `json:"qemu_tid"`
	HostRIP   string `json:"qemu_rip"`
	// Landed is set when the store went through: the kernel's own text
	// patching, or a QEMU store the guard could not skip (Reason says).
	Landed bool   `json:"landed,omitempty"`
	Reason string `json:"reason,omitempty"`
	Note   string `json:"note,omitempty"`
}

// DescribeBlocked turns the tracer's report of a blocked store into the
// guest's terms: the store instruction and virtual address
// (guestmem.FindStore), the symbol of RIP and the dispatch entry aimed
// at. What cannot be found is left out, with a note.
func (s *Session) DescribeBlocked(w tracer.BlockedWrite) BlockedWrite {
	out := BlockedWrite{At: w.At.UTC(), Source: "qemu", GPA: fmt.Sprintf("%#x", w.GPA), Bytes: hex.EncodeToString(w.Data), Len: len(w.Data),
		TID: w.TID, HostRIP: fmt.Sprintf("%#x", w.HostRIP), Landed: w.Landed, Reason: w.Reason}
	if w.VCPU < 0 || w.Regs == nil {
		return out
	}
	id := w.VCPU
	out.Source, out.VCPU = "guest", &id
	out.NextRIP = fmt.Sprintf("%#x", w.Regs.Regs.RIP)
	var notes []string
	src, err := s.machine.Source()
	if err != nil {
		notes = append(notes, err.Error())
	} else if st, err := guestmem.FindStore(src, *w.Regs, w.GPA, w.Data); err != nil {
		notes = append(notes, "store instruction: "+err.Error())
	} else {
		out.RIP, out.GVA, out.Insn = fmt.Sprintf("%#x", st.RIP), fmt.Sprintf("%#x", st.GVA), st.Insn
		s.guard.mu.Lock()
		k, d := s.guard.kernel, s.guard.dispatch
		s.guard.mu.Unlock()
		if k == nil {
			k = s.cachedKernel()
		}
		if k != nil {
			out.RIPSymbol, _ = k.DescribeAddr(st.RIP)
		}
		if d != nil {
			out.Target = d.Locate(st.GVA)
		}
	}
	out.Note = strings.Join(notes, "; ")
	return out
}

// cachedKernel is the kernel found by an earlier scan, or nil: describing
// a blocked store must not start a discovery (it runs while stores are
// being blocked).
func (s *Session) cachedKernel() *introspect.Kernel {
	if !s.mu.TryLock() {
		return nil
	}
	defer s.mu.Unlock()
	return s.d.kernel
}
