//go:build linux && amd64

package tracer

import (
	"sort"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
)

// Memslot is one KVM memory slot as the kernel holds it: guest physical
// range GPA..GPA+Size backed by QEMU's virtual memory at HVA.
type Memslot struct {
	// Slot is KVM's slot field: (address_space << 16) | id. Address space 1
	// is x86 SMM memory.
	Slot     uint32 `json:"slot"`
	Flags    uint32 `json:"flags"`
	GPA      uint64 `json:"gpa"`
	Size     uint64 `json:"size"`
	HVA      uint64 `json:"hva"`
	ReadOnly bool   `json:"readonly"`
	// DirtyLog is set while QEMU tracks dirty pages of the slot (VGA
	// framebuffer, migration).
	DirtyLog bool `json:"dirty_log"`
	// GuestMemfd marks a KVM_SET_USER_MEMORY_REGION2 slot backed by
	// guest_memfd; its private pages are not readable through HVA.
	GuestMemfd bool `json:"guest_memfd,omitempty"`
}

// AddressSpace returns the KVM address space id (0 normal, 1 SMM on x86).
func (m Memslot) AddressSpace() int { return int(m.Slot >> 16) }

// memslotOf is the slot a KVM_SET_USER_MEMORY_REGION(2) call sets.
func memslotOf(r ioctl.MemoryRegion) Memslot {
	m := Memslot{Slot: r.Slot, Flags: r.Flags, GPA: r.GuestPhysAddr, Size: r.MemorySize, HVA: r.UserspaceAddr}
	m.ReadOnly = m.Flags&kvmMemReadonly != 0
	m.DirtyLog = m.Flags&kvmMemLogDirtyPages != 0
	m.GuestMemfd = m.Flags&kvmMemGuestMemfd != 0
	return m
}

// memslotTable mirrors the kernel's table: calls that succeeded only; a
// call with size 0 deletes the slot; otherwise it creates or updates it
// (QEMU only changes flags of an existing slot, but we take whatever the
// kernel accepted).
type memslotTable map[uint32]Memslot

func (t memslotTable) apply(m Memslot) {
	if m.Size == 0 {
		delete(t, m.Slot)
		return
	}
	t[m.Slot] = m
}

// sorted returns the slots ordered by address space, then GPA.
func (t memslotTable) sorted() []Memslot {
	out := make([]Memslot, 0, len(t))
	for _, m := range t {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].AddressSpace() != out[j].AddressSpace() {
			return out[i].AddressSpace() < out[j].AddressSpace()
		}
		return out[i].GPA < out[j].GPA
	})
	return out
}
