package guestmem

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/kvmscope/kvmscope/tracer"
)

// cyclicMemory is guest physical memory below 4 GiB whose bytes repeat a
// short pattern: a few fuzzed bytes become whole page tables (entry i of
// every table is pattern entry i mod len/8). Above 4 GiB is a hole.
type cyclicMemory []byte

const cyclicLimit = 4 << 30

func (m cyclicMemory) ReadAt(p []byte, gpa int64) (int, error) {
	for i := range p {
		a := uint64(gpa) + uint64(i)
		if len(m) == 0 || a >= cyclicLimit {
			return i, &HoleError{GPA: a}
		}
		p[i] = m[a%uint64(len(m))]
	}
	return len(p), nil
}

func (m cyclicMemory) Regions() []Region { return []Region{{GPA: 0, Size: cyclicLimit}} }

func entries(es ...uint64) []byte {
	b := make([]byte, 8*len(es))
	for i, e := range es {
		binary.LittleEndian.PutUint64(b[i*8:], e)
	}
	return b
}

// FuzzTranslate walks page tables made of arbitrary bytes: the walker must
// terminate, never panic, and give answers consistent with the memory.
func FuzzTranslate(f *testing.F) {
	// Every level points to the table at 0x1000: a 4 KiB mapping.
	f.Add(entries(0x1063, 0x2063), uint64(0x1000), uint64(0xffffffff81000123), false)
	// NX, protection keys, PCID in CR3, a 2 MiB page.
	f.Add(entries(0x8000_0000_0000_1067, 0x7f00_0000_0020_10e3), uint64(0x3801), uint64(0xffff888000212345), false)
	// A 1 GiB page (PS at PDPT level) for a user address.
	f.Add(entries(0x4000_0083, 0x1007), uint64(0), uint64(0x40001234), false)
	// Five levels, an entry pointing into the hole above 4 GiB.
	f.Add(entries(0x2_0000_0003, 0x3003, 0x1003), uint64(0x2000), uint64(0xff11000000001010), true)
	// Not present and a PS bit at the top level.
	f.Add(entries(0x0, 0x83), uint64(0), uint64(0x0000100000000000), false)
	f.Add([]byte{}, uint64(0xfff), uint64(0), true)

	f.Fuzz(func(t *testing.T, data []byte, cr3, va uint64, la57 bool) {
		if len(data) > 1<<16 {
			return
		}
		mem := cyclicMemory(data)
		levels := 4
		if la57 {
			levels = 5
		}
		as := NewAddressSpace(mem, cr3, levels)
		gpa, err := as.Translate(va)
		if err != nil {
			var np *NotPresentError
			if errors.As(err, &np) && (np.VA != va || np.Level < 1 || np.Level > levels) {
				t.Fatalf("bad NotPresentError %+v for va %#x", np, va)
			}
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		if !as.Canonical(va) {
			t.Fatalf("non-canonical %#x translated", va)
		}
		if gpa&0xfff != va&0xfff {
			t.Fatalf("Translate(%#x) = %#x: page offset changed", va, gpa)
		}
		if gpa > PTEAddrMask|0xfff {
			t.Fatalf("Translate(%#x) = %#x: beyond 52 physical address bits", va, gpa)
		}
		// The cached answer and a fresh walk agree.
		if again, err := as.Translate(va); err != nil || again != gpa {
			t.Fatalf("cached Translate = %#x, %v; first %#x", again, err, gpa)
		}
		if fresh, err := NewAddressSpace(mem, cr3, levels).Translate(va); err != nil || fresh != gpa {
			t.Fatalf("fresh Translate = %#x, %v; first %#x", fresh, err, gpa)
		}
		// A read through the address space returns the bytes at gpa.
		var got, want [16]byte
		n, err := as.ReadAt(got[:], int64(va))
		wn, werr := mem.ReadAt(want[:], int64(gpa))
		if va&0xfff <= 0x1000-16 { // within one page
			if n != wn || (err == nil) != (werr == nil) || got != want {
				t.Fatalf("ReadAt(%#x) = %d %v %x; memory at %#x: %d %v %x", va, n, err, got, gpa, wn, werr, want)
			}
		} else if n > 16 || (err == nil && n != 16) {
			t.Fatalf("ReadAt(%#x) = %d, %v", va, n, err)
		}
	})
}

// FuzzOpenCore parses arbitrary bytes as an ELF core: no panics, bounded
// work, and a core that opens answers reads consistently with its regions.
func FuzzOpenCore(f *testing.F) {
	page := bytes.Repeat([]byte{0xcc}, 64)
	f.Add(buildCore(qemuNotes(2, true), []coreLoad{{gpa: 0, data: page, memsz: 128}, {gpa: 128, data: page, memsz: 64}}))
	f.Add(buildCore(qemuNotes(1, false), []coreLoad{{gpa: 0x100000, data: page[:8], memsz: 4096}}))
	f.Add(buildCore(note("CORE", 1, make([]byte, 8)), []coreLoad{{gpa: 0x1000, data: page, memsz: 64}}))
	f.Add([]byte("\x7fELF"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := NewCore(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		c.CPUs(context.Background())
		var prev uint64
		for i, r := range c.Regions() {
			if r.Size == 0 || (i > 0 && r.GPA <= prev) || r.End() < r.GPA {
				t.Fatalf("bad regions %+v", c.Regions())
			}
			prev = r.End()
			// Both ends of a region read without error.
			var b [16]byte
			n := min(uint64(len(b)), r.Size)
			if k, err := c.ReadAt(b[:n], int64(r.GPA)); err != nil || uint64(k) != n {
				t.Fatalf("read region start %#x: %d %v", r.GPA, k, err)
			}
			if k, err := c.ReadAt(b[:n], int64(r.End()-n)); err != nil || uint64(k) != n {
				t.Fatalf("read region end %#x: %d %v", r.End()-n, k, err)
			}
			var hole *HoleError
			if _, err := c.ReadAt(b[:1], int64(r.End())); i == len(c.Regions())-1 && !errors.As(err, &hole) {
				t.Fatalf("read after the last region: %v", err)
			}
		}
	})
}

// FuzzFindStore looks for the store behind a blocked write in memory and
// registers of arbitrary bytes: it must terminate, never panic, and what
// it returns must be an instruction that ends at RIP (or a REP string
// store at RIP) whose address maps to the page.
func FuzzFindStore(f *testing.F) {
	// Page tables at 0x1000 mapping everything 1:1 in 1 GiB pages, code
	// "mov [0x2100], rax" ending at 0x3008.
	pt := make([]byte, 0x4000)
	copy(pt[0x1000:], entries(0x2003))
	for i := 0; i < 4; i++ {
		copy(pt[0x2000+8*i:], entries(uint64(i)<<30|0x83))
	}
	copy(pt[0x3000:], []byte{0x48, 0x89, 0x04, 0x25, 0x00, 0x21, 0x00, 0x00})
	f.Add(pt, uint64(0x1000), uint64(0x3008), uint64(0x2100), uint64(0x4142434445464748), []byte("HGFEDCBA"))
	f.Add([]byte{0xf3, 0xab}, uint64(0), uint64(0x10), uint64(0), uint64(0), []byte{})
	f.Fuzz(func(t *testing.T, data []byte, cr3, rip, gpa, rax uint64, stored []byte) {
		if len(data) > 1<<16 || len(stored) > 8 {
			return
		}
		var regs tracer.SyncRegs
		regs.Regs.RIP, regs.Regs.RAX, regs.Regs.RCX = rip, rax, rax>>3
		regs.Sregs.CR0, regs.Sregs.CR3, regs.Sregs.CR4 = CR0PE|CR0PG, cr3, CR4PAE
		regs.Sregs.EFER, regs.Sregs.CS.L = EFERLMA, 1
		st, err := FindStore(cyclicMemory(data), regs, gpa, stored)
		if err != nil {
			return
		}
		if st.RIP > rip || rip-st.RIP > maxInsnLen || st.Insn == "" {
			t.Fatalf("store %+v does not end at rip %#x", st, rip)
		}
	})
}
