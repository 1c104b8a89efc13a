package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/guestmem"
)

// sliceMem is guest physical memory held in a byte slice.
type sliceMem []byte

func (m sliceMem) Regions() []guestmem.Region {
	return []guestmem.Region{{GPA: 0, Size: uint64(len(m)), Name: "ram"}}
}

func (m sliceMem) ReadAt(p []byte, gpa int64) (int, error) {
	if gpa < 0 || gpa >= int64(len(m)) {
		return 0, &guestmem.HoleError{GPA: uint64(gpa)}
	}
	n := copy(p, m[gpa:])
	if n < len(p) {
		return n, &guestmem.HoleError{GPA: uint64(gpa) + uint64(n)}
	}
	return n, nil
}

// A synthetic kernel in 12 MiB of guest memory, laid out as a real x86-64
// kernel is: the image (6 MiB) at physical 4 MiB and virtual
// 0xffffffff83000000 (KASLR shift 32 MiB); banner, kallsyms tables, BTF and
// page tables inside it; a 4-level PGD with the image mapping
// (level3/level2_kernel_pgt) and a direct map at 0xffff888000000000.
const (
	synthMem      = 12 << 20
	synthPhysBase = 4 << 20
	synthTextVA   = 0xffffffff83000000
	synthBanner   = "Linux version 5.15.0-synthetic (test@kvmscope) (gcc) #7 SMP Sat Nov 21 00:00:00 UTC 2026"
)

type synth struct {
	mem                      sliceMem
	pgd, level2              uint64
	initTask, btfStart, syms uint64
	nsyms                    int
}

func synthKernel(t testing.TB) *synth {
	mem := make(sliceMem, synthMem)
	va := func(off uint64) uint64 { return synthTextVA + off }
	pa := func(off uint64) uint64 { return synthPhysBase + off }
	put := func(gpa uint64, v uint64) { binary.LittleEndian.PutUint64(mem[gpa:], v) }
	s := &synth{}

	// .rodata: banner, BTF; .data: page tables, init_task, the bases.
	const (
		bannerOff = 0x80000
		ksymsOff  = 1 << 20
		btfOff    = 3 << 20
		pgdOff    = 5 << 20
		dataOff   = 5<<20 + 0x40000
		endOff    = 6 << 20
	)
	copy(mem[pa(bannerOff):], synthBanner+"\n\x00")
	raw := testBTF(t)
	copy(mem[pa(btfOff):], raw)

	syms := []genSym{
		{"fixed_percpu_data", 'D', 0}, {"cpu_number", 'd', 0x4000},
		{"_text", 'T', va(0)}, {"_stext", 'T', va(0)}, {"startup_64", 'T', va(0)},
	}
	for i := 0; i < 600; i++ {
		syms = append(syms, genSym{[]string{"do_sys_open", "vfs_read", "sched_fork", "kmalloc_order"}[i%4] + string(rune('0'+i%10)), 't', va(0x1000 + uint64(i)*0x40)})
	}
	syms = append(syms,
		genSym{"_etext", 'T', va(0x70000)},
		genSym{"linux_banner", 'R', va(bannerOff)},
		genSym{"__start_BTF", 'R', va(btfOff)},
		genSym{"__stop_BTF", 'R', va(btfOff + uint64(len(raw)))},
		genSym{"init_top_pgt", 'D', va(pgdOff)},
		genSym{"init_task", 'D', va(dataOff)},
		genSym{"vmemmap_base", 'D', va(dataOff + 0x1000)},
		genSym{"vmalloc_base", 'D', va(dataOff + 0x1008)},
		genSym{"page_offset_base", 'D', va(dataOff + 0x1010)},
		genSym{"_end", 'B', va(endOff)},
	)
	tables := genTables(t, syms, genLayouts[5], va(ksymsOff))
	copy(mem[pa(ksymsOff):], tables)
	s.syms, s.nsyms = pa(ksymsOff), len(syms)

	put(pa(dataOff+0x1000), 0xffffea0000000000)
	put(pa(dataOff+0x1008), 0xffffc90000000000)
	put(pa(dataOff+0x1010), 0xffff888000000000)

	// Page tables: PGD, level3_kernel_pgt, level2_kernel_pgt, then the
	// direct map's PUD and PMD.
	const table = 0x63 // present, writable, accessed, dirty
	const large = 0x1e3
	pgd, l3, l2, dmPUD, dmPMD := pa(pgdOff), pa(pgdOff+0x1000), pa(pgdOff+0x2000), pa(pgdOff+0x3000), pa(pgdOff+0x4000)
	put(pgd+511*8, l3|table)
	put(l3+510*8, l2|table)
	j := uint64(synthTextVA-startKernelMap) / pmdSize
	for i := uint64(0); i < endOff/pmdSize; i++ {
		put(l2+(j+i)*8, (synthPhysBase+i*pmdSize)|large)
	}
	put(pgd+273*8, dmPUD|table) // 0xffff888000000000
	put(dmPUD, dmPMD|table)
	for i := uint64(0); i < synthMem/pmdSize; i++ {
		put(dmPMD+i*8, i*pmdSize|large)
	}
	s.mem, s.pgd, s.level2, s.initTask, s.btfStart = mem, pgd, l2, va(dataOff), va(btfOff)
	return s
}

func checkSynth(t *testing.T, s *synth, k *Kernel) {
	t.Helper()
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"TextVA", k.TextVA, synthTextVA},
		{"PhysBase", k.PhysBase, synthPhysBase},
		{"KASLRShift", uint64(k.KASLRShift), 0x2000000},
		{"PGD", k.PGD, s.pgd},
		{"Levels", uint64(k.Levels), 4},
		{"PageOffsetBase", k.PageOffsetBase, 0xffff888000000000},
		{"VmallocBase", k.VmallocBase, 0xffffc90000000000},
		{"VmemmapBase", k.VmemmapBase, 0xffffea0000000000},
		{"Version", uint64(k.Version.Major*10000 + k.Version.Minor*100 + k.Version.Patch), 51500},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	if k.Banner != synthBanner {
		t.Errorf("Banner = %q", k.Banner)
	}
	if k.BTF == nil {
		t.Fatal("no BTF")
	}
	if off, err := k.MemberOffset("task_struct", "tasks"); err != nil || off != 8 {
		t.Errorf("task_struct.tasks = %d, %v", off, err)
	}
	// Reads through the direct map go through the page tables.
	var b [8]byte
	if err := k.ReadVirt(b[:], k.PhysToVirt(s.pgd+511*8)); err != nil || binary.LittleEndian.Uint64(b[:])&guestmem.PTEAddrMask != s.pgd+0x1000 {
		t.Errorf("PGD[511] through the direct map: %x, %v", b, err)
	}
}

// synthCPU is a vCPU running the synthetic kernel's code on its page
// tables.
func synthCPU(s *synth) guestmem.CPU {
	return guestmem.CPU{CR0: guestmem.CR0PE | guestmem.CR0PG, CR4: guestmem.CR4PAE, EFER: guestmem.EFERLMA | guestmem.EFERLME, CSL: true,
		CR3: s.pgd, RIP: synthTextVA + 0x1234}
}

func TestDiscoverSynthetic(t *testing.T) {
	s := synthKernel(t)
	t.Run("all symbols", func(t *testing.T) {
		k, err := Discover(s.mem, DiscoverOptions{Log: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		checkSynth(t, s, k)
		if a, ok := k.Symbol("init_task"); !ok || a != s.initTask {
			t.Errorf("init_task = %#x, %v", a, ok)
		}
	})
	t.Run("text symbols only", func(t *testing.T) {
		k, err := discover(s.mem, DiscoverOptions{Log: t.Logf}, textOnly)
		if err != nil {
			t.Fatal(err)
		}
		checkSynth(t, s, k)
		if k.Found["pgd"] != "found by structure" || k.Found["btf"] != "image scan" || k.Found["banner"] != "image scan" {
			t.Errorf("found: %v", k.Found)
		}
	})
	t.Run("vCPU cross-check", func(t *testing.T) {
		cpu := synthCPU(s)
		if _, err := Discover(s.mem, DiscoverOptions{CPUs: []guestmem.CPU{cpu}}); err != nil {
			t.Errorf("consistent CPU: %v", err)
		}
		// level2_kernel_pgt is where CR3's tables map the image; when
		// they lead nowhere (a zero page), it is searched for.
		j := int((synthTextVA - startKernelMap) / pmdSize)
		match := func(i0 int, _ uint64) bool { return i0 == j }
		for _, c := range []struct {
			name string
			cr3  uint64
		}{{"CR3", s.pgd}, {"zero CR3 page", 0}} {
			bad := cpu
			bad.CR3 = c.cr3
			l2, err := findLevel2(s.mem, s.mem.Regions(), []guestmem.CPU{bad}, s.syms, match)
			if err != nil || l2.gpa != s.level2 {
				t.Errorf("%s: level2_kernel_pgt %#x, %v; want %#x", c.name, l2.gpa, err, s.level2)
			}
		}
		// A vCPU in user mode still leads to the image.
		user := cpu
		user.RIP = 0x401000
		if h := codeHint(s.mem, []guestmem.CPU{user}); h != synthPhysBase {
			t.Errorf("hint from a vCPU in user mode: %#x, want the image at %#x", h, synthPhysBase)
		}
		if got := level2FromCPUs(s.mem, []guestmem.CPU{cpu}); len(got) == 0 || got[0] != s.level2 {
			t.Errorf("level2 from CR3 %#x: %#x, want %#x first", cpu.CR3, got, s.level2)
		}
		// A page table that maps _text elsewhere contradicts memory.
		other := append(sliceMem(nil), s.mem...)
		l3b, l2b := uint64(11<<20), uint64(11<<20+0x1000)
		binary.LittleEndian.PutUint64(other[11<<20+0x2000+511*8:], l3b|0x63)
		binary.LittleEndian.PutUint64(other[l3b+510*8:], l2b|0x63)
		binary.LittleEndian.PutUint64(other[l2b+24*8:], 0x1e3) // _text → physical 0
		cpu.CR3 = 11<<20 + 0x2000
		cpu.RIP = 0
		if _, err := Discover(other, DiscoverOptions{CPUs: []guestmem.CPU{cpu}}); err == nil {
			t.Error("CPU whose CR3 maps _text elsewhere was accepted")
		}
	})
	t.Run("decoy table", func(t *testing.T) {
		// Another kernel's kallsyms (a vmlinux in the page cache), found
		// first by the scan, is not the running kernel's.
		m := append(sliceMem(nil), s.mem...)
		decoy := genTables(t, genSymbols(1000), genLayouts[1], 0)
		copy(m[1<<20:], decoy)
		var log strings.Builder
		k, err := Discover(m, DiscoverOptions{Log: func(f string, a ...any) { fmt.Fprintf(&log, f+"\n", a...) }})
		if err != nil {
			t.Fatal(err)
		}
		checkSynth(t, s, k)
		if !strings.Contains(log.String(), "not the running kernel's") {
			t.Errorf("decoy not tried first:\n%s", log.String())
		}
	})
	t.Run("damaged", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			off  uint64
			want error
		}{
			{"no level2_kernel_pgt", s.level2 + 24*8, ErrNotFound},
			{"no kallsyms", s.syms + 0x1000, ErrNotFound},
		} {
			m := append(sliceMem(nil), s.mem...)
			clear(m[tc.off : tc.off+64])
			if tc.name == "no kallsyms" {
				clear(m[synthPhysBase+1<<20 : synthPhysBase+2<<20])
			}
			if _, err := Discover(m, DiscoverOptions{}); !errors.Is(err, tc.want) {
				t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
			}
		}
	})
}

func TestLooksLikeAddresses(t *testing.T) {
	page := func(f func(i int) uint32) []byte {
		b := make([]byte, guestmem.PageSize)
		for i := 0; i < guestmem.PageSize/4; i++ {
			binary.LittleEndian.PutUint32(b[4*i:], f(i))
		}
		return b
	}
	page64 := func(f func(i int) uint64) []byte {
		b := make([]byte, guestmem.PageSize)
		for i := 0; i < guestmem.PageSize/8; i++ {
			binary.LittleEndian.PutUint64(b[8*i:], f(i))
		}
		return b
	}
	gap := func(i int) uint32 { return uint32(i*37 + i*i%16) } // growing, uneven
	for _, tc := range []struct {
		name string
		page []byte
		want bool
	}{
		{"base-relative", page(func(i int) uint32 { return 0x100000 + gap(i) }), true},
		{"absolute per-CPU (negative, shrinking)", page(func(i int) uint32 { return uint32(-0x200000 - int32(gap(i))) }), true},
		{"PC-relative", page(func(i int) uint32 { return uint32(-0x1df0000 + int32(gap(i)) - 4*int32(i)) }), true},
		{"absolute addresses", page64(func(i int) uint64 { return 0xffffffff81000000 + uint64(gap(i)) }), true},
		{"zeros", make([]byte, guestmem.PageSize), false},
		{"all ones", bytes.Repeat([]byte{0xff}, guestmem.PageSize), false},
		{"text", bytes.Repeat([]byte("kallsyms_names "), guestmem.PageSize/15+1)[:guestmem.PageSize], false},
		{"random-ish", page(func(i int) uint32 { return uint32(i * 2654435761) }), false},
	} {
		if got := looksLikeAddresses(tc.page); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
