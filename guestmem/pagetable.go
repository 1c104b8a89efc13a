package guestmem

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// x86-64 paging structures (Intel SDM vol. 3, 4.5 "4-level and 5-level
// paging"). Every level is a 4 KiB table of 512 8-byte entries. Exported
// for the kernel locator (introspect), which reads page tables by hand.
const (
	pageShift = 12
	PageSize  = 1 << pageShift
	// PTEAddrMask selects bits 51:12 of CR3 or a paging-structure entry:
	// the physical address of the next table or of a 4 KiB page. Bits
	// 62:52 are ignored or protection-key bits and bit 63 is XD (NX); none
	// of them are part of the address.
	PTEAddrMask uint64 = 0x000f_ffff_ffff_f000
	PTEPresent  uint64 = 1 << 0
	// PTEPS marks a PDPTE that maps a 1 GiB page or a PDE that maps a
	// 2 MiB page; at PML4 and PML5 level the bit is reserved.
	PTEPS uint64 = 1 << 7
)

const (
	// ptiUserPGDBit is the bit that tells the two halves of a PTI page
	// table pair apart (arch/x86/mm/pti.c: PTI_USER_PGTABLE_BIT is
	// PAGE_SHIFT; the kernel allocates PGDs with PGD_ALLOCATION_ORDER 1).
	ptiUserPGDBit uint64 = 1 << pageShift

	// Cache bounds: hostile page tables can name as many distinct pages
	// as they like, so the caches are dropped when they fill.
	maxCachedTables = 4096  // 16 MiB of table pages
	maxCachedPages  = 65536 // translations
)

// ErrNonCanonical is wrapped by errors for virtual addresses that are not
// canonical for the paging mode (bits above the top level's index are not
// copies of the highest translated bit). The CPU raises #GP for them; they
// can never be mapped.
var ErrNonCanonical = errors.New("non-canonical virtual address")

// NotPresentError reports a virtual address whose translation stopped at an
// entry with the present bit clear.
type NotPresentError struct {
	VA uint64
	// Level is the paging-structure level of the entry that is not
	// present: 5 PML5E, 4 PML4E, 3 PDPTE, 2 PDE, 1 PTE.
	Level int
}

func (e *NotPresentError) Error() string {
	return fmt.Sprintf("guest virtual address %#x is not mapped: %s (level %d) not present",
		e.VA, levelName(e.Level), e.Level)
}

func levelName(level int) string {
	switch level {
	case 5:
		return "PML5 entry"
	case 4:
		return "PML4 entry"
	case 3:
		return "PDPT entry"
	case 2:
		return "page directory entry"
	case 1:
		return "page table entry"
	}
	return "paging entry"
}

// KernelCR3 returns the kernel half of a Linux PTI (page table isolation,
// "KPTI") PGD pair for a CR3 value, with the PCID and flag bits removed.
//
// A kernel built with CONFIG_PAGE_TABLE_ISOLATION allocates every PGD as an
// 8 KiB-aligned pair: the first page is the kernel's full view, the second
// (user CR3 = kernel CR3 | 0x1000) maps user space plus only the entry
// trampoline. A vCPU sampled while running user code with PTI active
// therefore has bit 12 set in CR3 and most kernel addresses are not mapped
// through it; clearing the bit gives the page tables the kernel itself
// uses. On a kernel built without PTI, PGDs are single 4 KiB pages and bit
// 12 carries no such meaning: callers should check that the result
// translates a known kernel address before trusting it.
func KernelCR3(cr3 uint64) uint64 {
	return cr3 & PTEAddrMask &^ ptiUserPGDBit
}

// KernelAddressSpace returns an address space that maps the kernel as the
// kernel sees it, for a CR3 value sampled from a vCPU in any mode: cr3
// itself when it maps probe (a kernel data address, e.g. init_task or
// linux_banner), else the kernel half of a PTI pair (KernelCR3) when that
// does. It works whether or not the guest kernel uses PTI, since without
// PTI every process's page tables share the kernel's upper half. It fails
// when neither maps probe.
func KernelAddressSpace(mem Memory, cr3 uint64, levels int, probe uint64) (*AddressSpace, error) {
	as := NewAddressSpace(mem, cr3, levels)
	_, err := as.Translate(probe)
	if err == nil {
		return as, nil
	}
	if k := KernelCR3(cr3); k != as.Root() {
		kas := NewAddressSpace(mem, k, levels)
		if _, kerr := kas.Translate(probe); kerr == nil {
			return kas, nil
		}
	}
	return nil, fmt.Errorf("page tables at %#x (or their PTI kernel half) do not map kernel address %#x: %w", cr3&PTEAddrMask, probe, err)
}

// AddressSpace is a guest virtual address space: the guest's own page
// tables, rooted at a CR3 value, read through guest physical memory.
//
// It caches table pages and translations, so it sees the page tables as they
// were when first read: use one AddressSpace per scan (or call Reset) so a
// scan reads a consistent snapshot and the next one sees the guest's
// changes. An AddressSpace is safe for concurrent use.
type AddressSpace struct {
	mem    Memory
	root   uint64
	levels int

	// entryReads: read the one entry each level needs instead of caching
	// whole table pages (see NewWalker).
	entryReads bool

	mu     sync.Mutex
	tables map[uint64]*[512]uint64 // table GPA → its entries
	pages  map[uint64]mapping      // VA >> 12 → the page mapping it
}

// mapping is one translated page: the GPA the page starts at and its size
// as a shift (12, 21 or 30).
type mapping struct {
	gpa   uint64
	shift uint8
}

// NewAddressSpace returns the address space whose top-level table is at
// cr3, for long-mode paging with levels 4 (PML4) or 5 (PML5, CR4.LA57).
// The PCID (bits 11:0) and the flag bits of cr3 are masked off; the PTI
// user bit is kept (see KernelCR3).
func NewAddressSpace(mem Memory, cr3 uint64, levels int) *AddressSpace {
	return &AddressSpace{
		mem:    mem,
		root:   cr3 & PTEAddrMask,
		levels: levels,
		tables: make(map[uint64]*[512]uint64),
		pages:  make(map[uint64]mapping),
	}
}

// Root returns the guest physical address of the top-level page table.
// NewWalker returns an address space for a few reads, such as one
// process's command line: each translation reads the 8-byte entry it needs
// at every level, where NewAddressSpace reads and keeps whole 4 KiB table
// pages (worth it when many addresses share the tables).
func NewWalker(mem Memory, cr3 uint64, levels int) *AddressSpace {
	a := NewAddressSpace(mem, cr3, levels)
	a.entryReads = true
	return a
}

func (a *AddressSpace) Root() uint64 { return a.root }

// Levels returns the number of paging levels (4 or 5).
func (a *AddressSpace) Levels() int { return a.levels }

// Memory returns the guest physical memory the page tables are read from.
func (a *AddressSpace) Memory() Memory { return a.mem }

// Reset drops every cached table page and translation.
func (a *AddressSpace) Reset() {
	a.mu.Lock()
	defer a.mu.Unlock()
	clear(a.tables)
	clear(a.pages)
}

// Canonical reports whether va is canonical for the address space's paging
// mode: bits 63:47 (4-level) or 63:56 (5-level) all equal.
func (a *AddressSpace) Canonical(va uint64) bool {
	bits := uint(9*a.levels + pageShift) // 48 or 57 translated bits
	top := int64(va) >> (bits - 1)       // sign-extends
	return top == 0 || top == -1
}

// Translate returns the guest physical address that va maps to. It fails
// with a *NotPresentError when a paging entry on the way is not present,
// with ErrNonCanonical for a non-canonical address, and with the memory
// source's error (e.g. *HoleError) when a table cannot be read.
//
// Access rights (U/S, R/W, XD, protection keys) are not checked: the
// introspector reads what the guest kernel can read.
func (a *AddressSpace) Translate(va uint64) (uint64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, err := a.lookup(va)
	if err != nil {
		return 0, err
	}
	return m.gpa + va&(1<<m.shift-1), nil
}

// lookup translates the page holding va. Precondition: a.mu is held.
func (a *AddressSpace) lookup(va uint64) (mapping, error) {
	if m, ok := a.pages[va>>pageShift]; ok {
		return m, nil
	}
	if a.levels != 4 && a.levels != 5 {
		return mapping{}, fmt.Errorf("translate %#x: unsupported paging with %d levels (want 4 or 5)", va, a.levels)
	}
	if !a.Canonical(va) {
		return mapping{}, fmt.Errorf("translate %#x: %w for %d-level paging", va, ErrNonCanonical, a.levels)
	}
	table := a.root
	for level := a.levels; level >= 1; level-- {
		shift := uint8(pageShift + 9*(level-1))
		idx := (va >> shift) & 511
		e, err := a.entry(table, idx)
		if err != nil {
			return mapping{}, fmt.Errorf("translate %#x: read %s table at %#x: %w", va, levelName(level), table, err)
		}
		if e&PTEPresent == 0 {
			return mapping{}, &NotPresentError{VA: va, Level: level}
		}
		if level == 1 || e&PTEPS != 0 {
			if level > 3 {
				// PS is reserved in PML4E/PML5E: the CPU would fault.
				return mapping{}, fmt.Errorf("translate %#x: %s %#x at %#x has the reserved PS bit set",
					va, levelName(level), e, table+idx*8)
			}
			// For large pages bits shift-1:12 hold PAT and reserved
			// bits, not address bits.
			m := mapping{gpa: e & PTEAddrMask &^ (1<<shift - 1), shift: shift}
			if len(a.pages) >= maxCachedPages {
				clear(a.pages)
			}
			a.pages[va>>pageShift] = m
			return m, nil
		}
		table = e & PTEAddrMask
	}
	panic("unreachable")
}

// entry returns entry idx of the table page at gpa. Precondition: a.mu is
// held.
func (a *AddressSpace) entry(gpa, idx uint64) (uint64, error) {
	if a.entryReads {
		var b [8]byte
		if _, err := a.mem.ReadAt(b[:], int64(gpa+idx*8)); err != nil {
			return 0, err
		}
		return binary.LittleEndian.Uint64(b[:]), nil
	}
	t, err := a.table(gpa)
	if err != nil {
		return 0, err
	}
	return t[idx], nil
}

// table returns the 512 entries of the table page at gpa, cached.
// Precondition: a.mu is held.
func (a *AddressSpace) table(gpa uint64) (*[512]uint64, error) {
	if t, ok := a.tables[gpa]; ok {
		return t, nil
	}
	var buf [PageSize]byte
	if _, err := a.mem.ReadAt(buf[:], int64(gpa)); err != nil {
		return nil, err
	}
	t := new([512]uint64)
	for i := range t {
		t[i] = binary.LittleEndian.Uint64(buf[i*8:])
	}
	if len(a.tables) >= maxCachedTables {
		clear(a.tables)
	}
	a.tables[gpa] = t
	return t, nil
}

// ReadAt reads len(p) bytes of guest virtual memory starting at va (an
// address as the guest writes it, e.g. int64(0xffffffff81000000)). The
// read may cross pages that map to unrelated physical pages. On a failure
// n counts the bytes read before it and err names the failing address.
func (a *AddressSpace) ReadAt(p []byte, va int64) (int, error) {
	n := 0
	for n < len(p) {
		addr := uint64(va) + uint64(n)
		a.mu.Lock()
		m, err := a.lookup(addr)
		a.mu.Unlock()
		if err != nil {
			return n, err
		}
		off := addr & (1<<m.shift - 1)
		chunk := uint64(len(p) - n)
		if rest := uint64(1)<<m.shift - off; chunk > rest {
			chunk = rest
		}
		k, err := a.mem.ReadAt(p[n:n+int(chunk)], int64(m.gpa+off))
		n += k
		if err == nil && uint64(k) < chunk {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return n, fmt.Errorf("read guest virtual %#x (physical %#x): %w", addr+uint64(k), m.gpa+off+uint64(k), err)
		}
	}
	return n, nil
}
