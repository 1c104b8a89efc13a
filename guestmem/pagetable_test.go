package guestmem

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// flatMemory is guest physical memory backed by a byte slice starting at
// GPA 0: test data for the page walker, which reads it like any source.
type flatMemory []byte

func (m flatMemory) ReadAt(p []byte, gpa int64) (int, error) {
	if gpa < 0 || uint64(gpa) >= uint64(len(m)) {
		return 0, &HoleError{GPA: uint64(gpa)}
	}
	n := copy(p, m[gpa:])
	if n < len(p) {
		return n, &HoleError{GPA: uint64(len(m))}
	}
	return n, nil
}

func (m flatMemory) Regions() []Region { return []Region{{GPA: 0, Size: uint64(len(m))}} }

// tableBuilder lays out x86-64 page tables in a flatMemory the way a kernel
// would: tables allocated from the bottom, data pages chosen by the test.
type tableBuilder struct {
	mem    flatMemory
	next   uint64 // next free table page
	root   uint64
	levels int
}

func newTableBuilder(size int, levels int) *tableBuilder {
	b := &tableBuilder{mem: make(flatMemory, size), next: 0x1000, levels: levels}
	b.root = b.alloc()
	return b
}

func (b *tableBuilder) alloc() uint64 {
	p := b.next
	b.next += PageSize
	if b.next > uint64(len(b.mem)) {
		panic("tableBuilder: out of memory")
	}
	return p
}

func (b *tableBuilder) entry(table, idx uint64) uint64 {
	return binary.LittleEndian.Uint64(b.mem[table+idx*8:])
}

func (b *tableBuilder) setEntry(table, idx, v uint64) {
	binary.LittleEndian.PutUint64(b.mem[table+idx*8:], v)
}

// mapPage maps va to gpa with a page of 1<<shift bytes (12, 21, 30);
// flags are or-ed into the leaf entry (present is always set).
func (b *tableBuilder) mapPage(va, gpa uint64, shift uint, flags uint64) {
	table := b.root
	for level := b.levels; ; level-- {
		s := uint(pageShift + 9*(level-1))
		idx := (va >> s) & 511
		if s == shift {
			leaf := gpa | flags | PTEPresent
			if shift > pageShift {
				leaf |= PTEPS
			}
			b.setEntry(table, idx, leaf)
			return
		}
		e := b.entry(table, idx)
		if e&PTEPresent == 0 {
			// Upper flags as Linux sets them: RW, US, A, D, and
			// NX plus protection-key garbage in the high bits to
			// check they are masked off.
			e = b.alloc() | 0x67 | 1<<63 | 0x7f<<52
			b.setEntry(table, idx, e)
		}
		table = e & PTEAddrMask
	}
}

func TestTranslate4Level(t *testing.T) {
	b := newTableBuilder(8<<20, 4)
	const (
		kva  = 0xffffffff81000000 // kernel text, 4 KiB pages
		kva2 = 0xffff888000200000 // direct map, a 2 MiB page
		uva  = 0x00007ffff7a00000 // user, 1 GiB page
	)
	b.mapPage(kva, 0x300000, 12, 1<<63|0x2<<59)    // NX and protection key bits
	b.mapPage(kva+0x1000, 0x1ff000, 12, 0)         // next VA page, unrelated GPA
	b.mapPage(kva2, 0x400000, 21, 1<<12)           // PAT bit in a 2 MiB PDE
	b.mapPage(uva&^(1<<30-1), 0x40000000, 30, 0x6) // GPA beyond memory: fine to translate
	copy(b.mem[0x300ff8:], "ABCDEFGH")
	copy(b.mem[0x1ff000:], "IJKLMNOP")
	copy(b.mem[0x4abcde:], "2mpage")

	// CR3 with a PCID in the low bits and a high flag set.
	for _, as := range []*AddressSpace{NewAddressSpace(b.mem, b.root|0x123, 4), NewWalker(b.mem, b.root|0x123, 4)} {
		checkTranslate4Level(t, as, b)
	}
}

// checkTranslate4Level runs the 4-level cases on an address space (with
// table pages cached, or with single-entry reads).
func checkTranslate4Level(t *testing.T, as *AddressSpace, b *tableBuilder) {
	t.Helper()
	const (
		kva  = 0xffffffff81000000
		kva2 = 0xffff888000200000
		uva  = 0x00007ffff7a00000
	)
	if as.Root() != b.root {
		t.Fatalf("Root() = %#x, want %#x", as.Root(), b.root)
	}
	for _, tc := range []struct{ va, gpa uint64 }{
		{kva, 0x300000},
		{kva + 0xabc, 0x300abc},
		{kva + 0x1234, 0x1ff234},
		{kva2, 0x400000},
		{kva2 + 0xabcde, 0x4abcde},
		{kva2 + 0x1fffff, 0x5fffff},
		{uva + 0x1234, 0x40000000 + (uva & (1<<30 - 1)) + 0x1234},
	} {
		got, err := as.Translate(tc.va)
		if err != nil {
			t.Errorf("Translate(%#x): %v", tc.va, err)
			continue
		}
		if got != tc.gpa {
			t.Errorf("Translate(%#x) = %#x, want %#x", tc.va, got, tc.gpa)
		}
	}

	// A read crossing from one 4 KiB page to an unrelated one.
	buf := make([]byte, 16)
	n, err := as.ReadAt(buf, vaddr(kva+0xff8))
	if err != nil || n != 16 || string(buf) != "ABCDEFGHIJKLMNOP" {
		t.Errorf("ReadAt across pages = %d %q %v", n, buf, err)
	}
	n, err = as.ReadAt(buf[:6], vaddr(kva2+0xabcde))
	if err != nil || n != 6 || string(buf[:6]) != "2mpage" {
		t.Errorf("ReadAt 2 MiB page = %d %q %v", n, buf[:6], err)
	}

	// Not present at each level.
	var np *NotPresentError
	for _, tc := range []struct {
		va    uint64
		level int
	}{
		{0x0000100000000000, 4},
		{kva&^(1<<39-1) | 0x40000000 | kva&(1<<30-1), 3}, // other PDPTE in kernel PML4 slot
		{kva + 0x200000, 2},
		{kva + 0x2000, 1},
	} {
		_, err := as.Translate(tc.va)
		if !errors.As(err, &np) || np.Level != tc.level || np.VA != tc.va {
			t.Errorf("Translate(%#x) error = %v, want not present at level %d", tc.va, err, tc.level)
		}
	}
	// A read running into an unmapped page returns the bytes before it.
	n, err = as.ReadAt(make([]byte, 0x2000), vaddr(kva+0x1000))
	if n != 0x1000 || !errors.As(err, &np) || np.VA != kva+0x2000 || np.Level != 1 {
		t.Errorf("ReadAt into unmapped page = %d, %v", n, err)
	}
	if np != nil && !bytes.Contains([]byte(np.Error()), []byte("0xffffffff81002000")) {
		t.Errorf("error does not name the VA: %v", np)
	}

	// Non-canonical addresses.
	for _, va := range []uint64{0x0000800000000000, 0xffff7fffffffffff, 0x8000000000000000} {
		if _, err := as.Translate(va); !errors.Is(err, ErrNonCanonical) {
			t.Errorf("Translate(%#x) error = %v, want ErrNonCanonical", va, err)
		}
	}
}

func TestTranslate5Level(t *testing.T) {
	b := newTableBuilder(4<<20, 5)
	const va uint64 = 0xff11000000001000 // canonical for 57 bits, not for 48
	b.mapPage(va, 0x200000, 12, 0)
	copy(b.mem[0x200010:], "la57")
	as := NewAddressSpace(b.mem, b.root, 5)
	gpa, err := as.Translate(va + 0x10)
	if err != nil || gpa != 0x200010 {
		t.Fatalf("Translate = %#x, %v", gpa, err)
	}
	if as4 := NewAddressSpace(b.mem, b.root, 4); as4.Canonical(va) {
		t.Errorf("%#x canonical for 4-level paging", va)
	}
	if _, err := as.Translate(0xfe00000000000000); !errors.Is(err, ErrNonCanonical) {
		t.Errorf("5-level non-canonical: %v", err)
	}
	var np *NotPresentError
	if _, err := as.Translate(0x0080000000000000); !errors.As(err, &np) || np.Level != 5 {
		t.Errorf("PML5E not present: %v", err)
	}
}

func TestTranslateBadTables(t *testing.T) {
	b := newTableBuilder(1<<20, 4)
	// A PML4 entry with PS set (reserved) and one pointing outside memory.
	b.setEntry(b.root, 1, 0x2000|PTEPresent|PTEPS)
	b.setEntry(b.root, 2, 0x000f_ffff_ffff_f000|PTEPresent)
	as := NewAddressSpace(b.mem, b.root, 4)
	if _, err := as.Translate(1 << 39); err == nil {
		t.Error("PS in PML4E: no error")
	}
	var hole *HoleError
	if _, err := as.Translate(2 << 39); !errors.As(err, &hole) || hole.GPA != 0x000f_ffff_ffff_f000 {
		t.Errorf("table outside memory: %v", err)
	}
	if _, err := NewAddressSpace(b.mem, b.root, 3).Translate(0); err == nil {
		t.Error("3 levels accepted")
	}
	// A self-referencing table (the PML4 maps itself at every level)
	// terminates after at most levels steps.
	b.setEntry(b.root, 3, b.root|PTEPresent)
	if _, err := NewAddressSpace(b.mem, b.root, 4).Translate(3<<39 | 3<<30 | 3<<21 | 3<<12); err != nil {
		t.Errorf("self-map: %v", err)
	}
}

func TestTranslateCacheReset(t *testing.T) {
	b := newTableBuilder(1<<20, 4)
	b.mapPage(0x1000, 0x80000, 12, 0)
	as := NewAddressSpace(b.mem, b.root, 4)
	if gpa, err := as.Translate(0x1000); err != nil || gpa != 0x80000 {
		t.Fatalf("Translate = %#x, %v", gpa, err)
	}
	// The guest remaps the page; the snapshot keeps the old view until
	// Reset.
	b.mapPage(0x1000, 0x90000, 12, 0)
	if gpa, _ := as.Translate(0x1000); gpa != 0x80000 {
		t.Errorf("cached Translate = %#x, want the old 0x80000", gpa)
	}
	as.Reset()
	if gpa, _ := as.Translate(0x1000); gpa != 0x90000 {
		t.Errorf("Translate after Reset = %#x, want 0x90000", gpa)
	}
}

func TestKernelCR3(t *testing.T) {
	for _, tc := range []struct{ in, want uint64 }{
		{0x10a4000, 0x10a4000},
		{0x10a5000 | 0x801, 0x10a4000}, // user half with a user PCID
		{0x8000_0000_010a_5018, 0x10a4000},
	} {
		if got := KernelCR3(tc.in); got != tc.want {
			t.Errorf("KernelCR3(%#x) = %#x, want %#x", tc.in, got, tc.want)
		}
	}
}

// vaddr converts a virtual address to ReadAt's offset type at run time
// (constant kernel addresses overflow int64 at compile time).
func vaddr(va uint64) int64 { return int64(va) }
