//go:build linux && amd64

package tracer

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The guard: guest-physical pages the guest may not write, enforced from
// the host on a stock KVM. docs/dispatch-guard.md explains the choice.
//
// KVM has no per-page protection a VMM can set, but it has read-only
// memslots: a guest store into one is not executed but emulated, and KVM
// exits to userspace with KVM_EXIT_MMIO, the bytes the store wrote and
// RIP already past it. So the guard carves each of QEMU's memslots that
// holds a guarded page into pieces, the guarded pages in read-only
// pieces, with KVM_SET_USER_MEMORY_REGION run as QEMU (inject.go) while
// every QEMU thread is stopped. Reads and instruction fetches of the
// pages, and every other page of the slot, run at full speed.
//
// QEMU does not know of the carve: for the MMIO exit it writes the bytes
// into its RAM at that address, which would make the store land. So the
// guard also mprotects QEMU's mapping of the guarded pages read-only.
// QEMU's memmove then faults; the tracer sees the SIGSEGV before QEMU
// does, records the write (kvm_run still holds the exit), steps QEMU
// past its store instruction and suppresses the signal (guardfault.go).
// QEMU completes the MMIO, the guest goes on after its store, and the
// page is unchanged. Any other QEMU write into a guarded page (device
// DMA) is skipped the same way; a read(2)-style DMA by the kernel into
// it fails with EFAULT, which QEMU reports to the guest as an I/O error.
//
// QEMU's own memslot calls that touch a carved slot (deleting it, dirty
// logging on or off) are skipped at their seccomp stop and replayed at
// their exit stop on the slot as QEMU made it, then the guard carves
// again what it still can; a slot under dirty logging (migration) is left
// whole, and the status says so.

// GuardRange is a guest-physical range the guest may not write; the guard
// protects whole 4 KiB pages.
type GuardRange struct {
	GPA  uint64 `json:"gpa"`
	Size uint64 `json:"size"`
}

// End is the first address after r.
func (r GuardRange) End() uint64 { return r.GPA + r.Size }

// GuardStatus is what the guard protects.
type GuardStatus struct {
	// Ranges are what was asked for, in whole pages.
	Ranges []GuardRange `json:"ranges"`
	// Protected are the pages KVM holds read-only now.
	Protected []GuardRange `json:"protected"`
	// Unprotected are pages asked for and not protected, with why.
	Unprotected []UnprotectedRange `json:"unprotected,omitempty"`
	// Blocked counts the guest stores skipped since the start.
	Blocked uint64 `json:"blocked"`
	// Allowed counts the stores into guarded pages let through: the
	// kernel's own text patching (GuardOptions.PatchCR3), or a QEMU store
	// the guard could not skip (BlockedWrite.Landed says why).
	Allowed uint64 `json:"allowed"`
}

// GuardOptions say which guest stores into guarded pages are not
// tampering.
type GuardOptions struct {
	// PatchCR3, when not 0, is the page-table root the guest kernel
	// patches its own text with (poking_mm's, introspect.PokingPGD): a
	// store made with it loaded is let through and logged as allowed.
	PatchCR3 uint64
}

// cr3Root is the page-table root in a CR3 value: without the PCID, the
// no-flush bit and PTI's user-half bit.
func cr3Root(cr3 uint64) uint64 { return cr3 &^ (1<<63 | 1<<12 | 0xfff) }

// UnprotectedRange is a range the guard could not protect.
type UnprotectedRange struct {
	GuardRange
	Reason string `json:"reason"`
}

// BlockedWrite is one store into a guarded page that the guard skipped.
type BlockedWrite struct {
	At  time.Time `json:"at"`
	GPA uint64    `json:"gpa"`
	// Data is what the store would have written; nil when unknown (a
	// QEMU access that is not a plain register store).
	Data []byte `json:"data"`
	// VCPU is the vCPU whose guest store it was, or -1 for a write by
	// QEMU itself (device emulation).
	VCPU int `json:"vcpu"`
	// Regs are the vCPU's registers at the exit: KVM had emulated the
	// store, so Regs.Regs.RIP is the instruction after it.
	Regs *SyncRegs `json:"-"`
	// TID is the QEMU thread whose access faulted, HostRIP its
	// instruction.
	TID     int    `json:"tid"`
	HostRIP uint64 `json:"host_rip"`
	// Landed is set when the guard could not skip QEMU's store and let
	// it through (Reason says why) rather than crash QEMU.
	Landed bool   `json:"landed,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// carve is one of QEMU's memslots as the guard split it in the kernel.
type carve struct {
	orig   Memslot
	pieces []Memslot // in GPA order; the read-only ones are guarded
}

// equal reports whether o splits the same slot the same way (the ids of
// the extra pieces aside: they are the guard's choice).
func (c *carve) equal(o *carve) bool {
	if o == nil || c.orig != o.orig || len(c.pieces) != len(o.pieces) {
		return false
	}
	for i, p := range c.pieces {
		q := o.pieces[i]
		q.Slot = p.Slot
		if p != q {
			return false
		}
	}
	return true
}

// guard is the tracer's guard state. The tracer thread changes carves,
// with mu held; readers take mu.
type guard struct {
	mu       sync.Mutex
	want     []GuardRange
	carves   map[uint32]*carve // by QEMU's slot id
	skipped  []UnprotectedRange
	blocked  uint64
	allowed  uint64
	opts     GuardOptions
	maxSlots uint32
	report   func(BlockedWrite)
	// replaying is set from guardReplay's undoing of the carves to
	// guardRearm's carving again: the pages are unprotected then, for
	// QEMU's memslot call.
	replaying bool
}

// pageRanges rounds each range out to whole pages, merges them and drops
// empty ones.
func pageRanges(in []GuardRange) ([]GuardRange, error) {
	var out []GuardRange
	for _, r := range in {
		if r.Size == 0 {
			continue
		}
		lo := r.GPA &^ 0xfff
		hi := (r.End() + 0xfff) &^ 0xfff
		if r.End() < r.GPA || hi < lo || hi == 0 {
			return nil, fmt.Errorf("guard range %#x+%#x overflows", r.GPA, r.Size)
		}
		out = append(out, GuardRange{lo, hi - lo})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GPA < out[j].GPA })
	merged := out[:0]
	for _, r := range out {
		if n := len(merged); n > 0 && r.GPA <= merged[n-1].End() {
			merged[n-1].Size = max(merged[n-1].End(), r.End()) - merged[n-1].GPA
			continue
		}
		merged = append(merged, r)
	}
	return merged, nil
}

// active reports whether any page is carved.
func (g *guard) active() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.carves) > 0
}

// plan computes the carves the wanted ranges need in QEMU's memslots, and
// what cannot be protected. Precondition: g.mu held.
func (g *guard) plan(slots []Memslot) (map[uint32]*carve, []UnprotectedRange) {
	out := map[uint32]*carve{}
	var skipped []UnprotectedRange
	for _, w := range g.want {
		covered := uint64(0)
		for _, m := range slots {
			lo, hi := max(w.GPA, m.GPA), min(w.End(), m.GPA+m.Size)
			if m.AddressSpace() != 0 || lo >= hi {
				continue
			}
			covered += hi - lo
			r := GuardRange{lo, hi - lo}
			switch {
			case m.ReadOnly:
				continue // ROM: the guest cannot write it anyway
			case m.DirtyLog:
				skipped = append(skipped, UnprotectedRange{r, fmt.Sprintf("memslot %d is under dirty logging (migration or a framebuffer)", m.Slot)})
				continue
			case m.GuestMemfd:
				skipped = append(skipped, UnprotectedRange{r, fmt.Sprintf("memslot %d is backed by guest_memfd", m.Slot)})
				continue
			case m.HVA&0xfff != 0 || m.GPA&0xfff != 0:
				skipped = append(skipped, UnprotectedRange{r, fmt.Sprintf("memslot %d is not page aligned", m.Slot)})
				continue
			}
			c := out[m.Slot]
			if c == nil {
				c = &carve{orig: m}
				out[m.Slot] = c
			}
			c.pieces = append(c.pieces, Memslot{GPA: r.GPA, Size: r.Size, ReadOnly: true})
		}
		if covered < w.Size {
			skipped = append(skipped, UnprotectedRange{w, "not all of it is guest RAM"})
		}
	}
	used := map[uint32]bool{}
	for _, m := range slots {
		used[m.Slot] = true
	}
	for _, c := range g.carves {
		for _, p := range c.pieces {
			used[p.Slot] = true
		}
	}
	next := g.maxSlots
	ids := func() uint32 {
		for next > 0 {
			next--
			if !used[next] {
				used[next] = true
				return next
			}
		}
		return 0 // not reached: KVM has thousands of slots, QEMU uses a few
	}
	for _, c := range out {
		c.pieces = fillPieces(c.orig, c.pieces)
		for i := range c.pieces {
			p := &c.pieces[i]
			if i == 0 {
				p.Slot = c.orig.Slot
			} else {
				p.Slot = ids()
			}
			p.HVA = c.orig.HVA + (p.GPA - c.orig.GPA)
			p.Flags = c.orig.Flags
			if p.ReadOnly {
				p.Flags |= kvmMemReadonly
			}
		}
	}
	return out, skipped
}

// fillPieces returns the pieces that tile slot m: the guarded ones given
// (sorted, disjoint, inside m) with writable ones between them.
func fillPieces(m Memslot, guarded []Memslot) []Memslot {
	sort.Slice(guarded, func(i, j int) bool { return guarded[i].GPA < guarded[j].GPA })
	var out []Memslot
	at := m.GPA
	for _, g := range guarded {
		if g.GPA < at {
			// Overlapping wanted ranges were merged: only adjacent.
			g.Size -= at - g.GPA
			g.GPA = at
		}
		if g.Size == 0 {
			continue
		}
		if g.GPA > at {
			out = append(out, Memslot{GPA: at, Size: g.GPA - at})
		}
		if n := len(out); n > 0 && out[n-1].ReadOnly && out[n-1].GPA+out[n-1].Size == g.GPA {
			out[n-1].Size += g.Size
		} else {
			out = append(out, g)
		}
		at = g.GPA + g.Size
	}
	if end := m.GPA + m.Size; at < end {
		out = append(out, Memslot{GPA: at, Size: end - at})
	}
	return out
}

// slotIO is the kernel side of the guard: memslot changes and mprotect,
// made as QEMU through run.
type slotIO struct {
	run  runFunc
	vmFD int
}

func (s slotIO) set(m Memslot, size uint64) error {
	var b [kvmUserspaceMemoryRegionLen]byte
	le := binary.LittleEndian
	le.PutUint32(b[0:], m.Slot)
	le.PutUint32(b[4:], m.Flags)
	le.PutUint64(b[8:], m.GPA)
	le.PutUint64(b[16:], size)
	le.PutUint64(b[24:], m.HVA)
	_, err := s.run(Syscall{NR: unix.SYS_IOCTL, Args: [6]uint64{uint64(s.vmFD), KVMSetUserMemoryRegion}, Buf: b[:], BufArg: 2})
	if err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION slot %d gpa %#x size %#x: %w", m.Slot, m.GPA, size, err)
	}
	return nil
}

func (s slotIO) protect(m Memslot, prot int) error {
	if _, err := s.run(Syscall{NR: unix.SYS_MPROTECT, Args: [6]uint64{m.HVA, m.Size, uint64(prot)}}); err != nil {
		return fmt.Errorf("mprotect QEMU's RAM at %#x+%#x: %w", m.HVA, m.Size, err)
	}
	return nil
}

const protRW = unix.PROT_READ | unix.PROT_WRITE

// carveSlot replaces c.orig with c.pieces in the kernel; on failure it
// puts c.orig back.
func (s slotIO) carveSlot(c *carve) error {
	if err := s.set(c.orig, 0); err != nil {
		return err
	}
	for i, p := range c.pieces {
		if err := s.set(p, p.Size); err != nil {
			for _, q := range c.pieces[:i] {
				s.set(q, 0)
			}
			s.set(c.orig, c.orig.Size)
			return err
		}
	}
	for i, p := range c.pieces {
		if !p.ReadOnly {
			continue
		}
		if err := s.protect(p, unix.PROT_READ); err != nil {
			for _, q := range c.pieces[:i] {
				if q.ReadOnly {
					s.protect(q, protRW)
				}
			}
			s.uncarveSlot(&carve{orig: c.orig, pieces: c.pieces})
			return err
		}
	}
	return nil
}

// uncarveSlot puts c.orig back in place of c.pieces, as QEMU made it.
// It goes on past errors (each undoes what it can) and returns the first.
func (s slotIO) uncarveSlot(c *carve) error {
	var first error
	keep := func(err error) {
		if first == nil {
			first = err
		}
	}
	for _, p := range c.pieces {
		if p.ReadOnly {
			if err := s.protect(p, protRW); err != nil {
				keep(err)
			}
		}
	}
	for _, p := range c.pieces {
		if err := s.set(p, 0); err != nil {
			keep(err)
		}
	}
	if err := s.set(c.orig, c.orig.Size); err != nil {
		keep(err)
	}
	return first
}

// apply brings the kernel's memslots to the plan for the wanted ranges
// and QEMU's current slots. Precondition: QEMU is frozen, g.mu held.
func (g *guard) apply(s slotIO, slots []Memslot) error {
	if g.maxSlots == 0 && len(g.want) > 0 {
		n, err := s.run(Syscall{NR: unix.SYS_IOCTL, Args: [6]uint64{uint64(s.vmFD), kvmCheckExtension, kvmCapNrMemslots}})
		if err != nil || n <= 1 {
			return fmt.Errorf("KVM_CHECK_EXTENSION(KVM_CAP_NR_MEMSLOTS) = %d: %v", n, err)
		}
		g.maxSlots = uint32(min(n, 1<<15))
	}
	want, skipped := g.plan(slots)
	var errs []error
	for id, c := range g.carves {
		if !c.equal(want[id]) {
			if err := s.uncarveSlot(c); err != nil {
				errs = append(errs, err)
			}
			delete(g.carves, id)
		}
	}
	for id, c := range want {
		if g.carves[id] != nil {
			continue
		}
		if err := s.carveSlot(c); err != nil {
			errs = append(errs, err)
			for _, p := range c.pieces {
				if p.ReadOnly {
					skipped = append(skipped, UnprotectedRange{GuardRange{p.GPA, p.Size}, err.Error()})
				}
			}
			continue
		}
		if g.carves == nil {
			g.carves = map[uint32]*carve{}
		}
		g.carves[id] = c
	}
	g.skipped = skipped
	return errors.Join(errs...)
}

// touches reports whether QEMU's memslot call m involves a carved slot:
// its id is one the guard split or uses, or its range overlaps one.
func (g *guard) touches(m Memslot) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for id, c := range g.carves {
		if m.Slot == id {
			return true
		}
		for _, p := range c.pieces {
			if p.Slot == m.Slot {
				return true
			}
		}
		if m.AddressSpace() == 0 && m.Size > 0 && m.GPA < c.orig.GPA+c.orig.Size && c.orig.GPA < m.GPA+m.Size {
			return true
		}
	}
	return false
}

// guardedPiece returns the first read-only (guarded) piece for which
// match holds.
func (g *guard) guardedPiece(match func(p Memslot) bool) (Memslot, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, c := range g.carves {
		for _, p := range c.pieces {
			if p.ReadOnly && match(p) {
				return p, true
			}
		}
	}
	return Memslot{}, false
}

// guardedHVA returns the guest-physical address of QEMU's address hva if
// it is in a guarded page.
func (g *guard) guardedHVA(hva uint64) (uint64, bool) {
	p, ok := g.guardedPiece(func(p Memslot) bool { return hva >= p.HVA && hva-p.HVA < p.Size })
	return p.GPA + (hva - p.HVA), ok
}

// hvaOf is QEMU's address of guarded guest-physical gpa.
func (g *guard) hvaOf(gpa uint64) (uint64, bool) {
	p, ok := g.guardedPiece(func(p Memslot) bool { return gpa >= p.GPA && gpa-p.GPA < p.Size })
	return p.HVA + (gpa - p.GPA), ok
}

// guardedGPA reports whether gpa is in a guarded page.
func (g *guard) guardedGPA(gpa uint64) bool { return g.overlaps(gpa, 1) }

// overlaps reports whether gpa..gpa+size touches a guarded page.
func (g *guard) overlaps(gpa, size uint64) bool {
	_, ok := g.guardedPiece(func(p Memslot) bool { return gpa < p.GPA+p.Size && p.GPA < gpa+size })
	return ok
}

func (g *guard) status() GuardStatus {
	g.mu.Lock()
	defer g.mu.Unlock()
	st := GuardStatus{Ranges: slices.Clone(g.want), Unprotected: slices.Clone(g.skipped), Blocked: g.blocked, Allowed: g.allowed}
	if g.replaying {
		for _, w := range g.want {
			st.Unprotected = append(st.Unprotected, UnprotectedRange{w, "QEMU is changing the memslot; the guard protects it again after"})
		}
	}
	for _, c := range g.carves {
		for _, p := range c.pieces {
			if p.ReadOnly {
				st.Protected = append(st.Protected, GuardRange{p.GPA, p.Size})
			}
		}
	}
	sort.Slice(st.Protected, func(i, j int) bool { return st.Protected[i].GPA < st.Protected[j].GPA })
	if st.Ranges == nil {
		st.Ranges = []GuardRange{}
	}
	if st.Protected == nil {
		st.Protected = []GuardRange{}
	}
	return st
}

// ErrGuardTCG is returned by Protect when QEMU made no KVM VM.
var ErrGuardTCG = errors.New("the guard needs KVM: under TCG kvmscope detects and restores only")

// Protect makes ranges (whole pages; it replaces any earlier set) read-only
// for the guest; nil unprotects everything. It returns what is protected:
// pages that are not guest RAM, or in a slot under dirty logging, are
// listed as unprotected with the reason. The carving runs as QEMU on vCPU
// 0's thread with every other QEMU thread stopped.
func (t *Tracer) Protect(ctx context.Context, ranges []GuardRange, opts GuardOptions) (GuardStatus, error) {
	want, err := pageRanges(ranges)
	if err != nil {
		return GuardStatus{}, err
	}
	v := t.vm
	v.mu.Lock()
	pid, vmFD := v.pid, v.vmFD
	var tid int
	ids := make([]int, 0, len(v.vcpus))
	for id := range v.vcpus {
		ids = append(ids, id)
	}
	if len(ids) > 0 {
		tid = v.vcpus[slices.Min(ids)].TID
	}
	v.mu.Unlock()
	if pid == 0 || tid == 0 {
		return GuardStatus{}, ErrGuardTCG
	}
	err = t.injectFunc(ctx, pid, tid, true, func(run runFunc) error {
		t.guard.mu.Lock()
		defer t.guard.mu.Unlock()
		t.guard.want, t.guard.opts = want, opts
		return t.guard.apply(slotIO{run: run, vmFD: vmFD}, v.Memslots())
	})
	return t.guard.status(), err
}

// GuardStatus reports what the guard protects.
func (t *Tracer) GuardStatus() GuardStatus { return t.guard.status() }

// guardReplay runs QEMU's memslot call c, which the guard skipped at its
// seccomp stop because it touches a carved slot, on the slots as QEMU
// made them, at the call's exit stop (QEMU frozen): the carves it touches
// are undone, the call runs as QEMU issued it, and its result becomes the
// call's. It returns that result.
func (t *Tracer) guardReplay(c *call) (ret int64, failed bool) {
	g := &t.guard
	s := slotIO{run: t.runOn(c.tid), vmFD: c.fd}
	g.mu.Lock()
	for id, cv := range g.carves {
		if err := s.uncarveSlot(cv); err != nil {
			t.log.Error().Err(err).Uint32("slot", id).Msg("guard: undo a carve for QEMU's memslot call")
		}
		delete(g.carves, id)
	}
	g.replaying = len(g.want) > 0
	g.mu.Unlock()
	ret, err := t.runOn(c.tid)(Syscall{NR: unix.SYS_IOCTL, Args: [6]uint64{uint64(c.fd), uint64(c.cmd), c.arg}})
	if err != nil {
		if errno, ok := err.(unix.Errno); ok {
			ret = -int64(errno)
		} else {
			t.log.Error().Err(err).Msg("guard: replay QEMU's memslot call")
			ret = -int64(unix.EFAULT)
		}
	}
	var regs unix.PtraceRegs
	if err := unix.PtraceGetRegs(c.tid, &regs); err == nil {
		regs.Rax = uint64(ret)
		unix.PtraceSetRegs(c.tid, &regs)
	}
	return ret, ret < 0
}

// guardRearm carves again, after one of QEMU's memslot calls (at its exit
// stop, QEMU frozen), whatever the new memslots let the guard protect.
func (t *Tracer) guardRearm(c *call) {
	g := &t.guard
	g.mu.Lock()
	defer g.mu.Unlock()
	g.replaying = false
	if len(g.want) == 0 {
		return
	}
	if err := g.apply(slotIO{run: t.runOn(c.tid), vmFD: c.fd}, t.vm.Memslots()); err != nil {
		t.log.Error().Err(err).Msg("guard: protect again after QEMU's memslot change")
	}
}

// writeGuarded writes b at guest-physical gpa, which touches guarded
// pages, from the host. QEMU's mapping of the pages is read-only, so
// process_vm_writev fails there; /proc/PID/mem writes with FOLL_FORCE,
// which goes past a read-only private mapping (QEMU's anonymous RAM), and
// a shared mapping (memfd RAM) is written through its file
// (/proc/PID/map_files). Neither needs QEMU's cooperation, so this works
// while QEMU is paused (integrity --restore pauses it).
func (t *Tracer) writeGuarded(ctx context.Context, gpa uint64, b []byte) error {
	v := t.vm
	v.mu.Lock()
	pid := v.pid
	slots := v.slots.sorted()
	v.mu.Unlock()
	var hva uint64
	found := false
	for _, m := range slots {
		if m.AddressSpace() == 0 && gpa >= m.GPA && gpa+uint64(len(b)) <= m.GPA+m.Size {
			hva, found = m.HVA+(gpa-m.GPA), true
		}
	}
	if !found {
		return fmt.Errorf("guest physical %#x+%#x is not in one memslot", gpa, len(b))
	}
	return writeForced(pid, hva, b)
}
