package introspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/guestmem"
)

// A synthetic kernel for the dispatch checks, in 8 MiB of guest memory:
// the image (2 MiB) at physical 2 MiB and virtual 0xffffffff81000000 (no
// KASLR), its text holding system calls, x64_sys_call, ftrace's callers,
// do_syscall_64 and two exception handlers; sys_call_table in its data;
// page tables that map one 2 MiB page of the module area
// (0xffffffffa0000000, physical 6 MiB) where an ftrace trampoline is; the
// IDT at physical 1 MiB, read through the direct map.
const (
	sdText     = 0xffffffff81000000
	sdPhys     = 2 << 20
	sdModVA    = 0xffffffffa0000000
	sdModPhys  = 6 << 20
	sdIDTPhys  = 1 << 20
	sdPageOff  = 0xffff888000000000
	sdTramp    = sdModVA + 0x1000 // an ftrace trampoline
	sdEvil     = sdModVA + 0x2000 // in the module area, no trampoline, no module
	sdX64      = sdText + 0x2000
	sdTable    = sdText + 0x100000
	sdTemplate = 0x40 // bytes of ftrace_caller before its op-pointer load
)

var sdSyms = map[string]uint64{
	"__x64_sys_read": 0x1000, "__x64_sys_kill": 0x1100, "__x64_sys_getpid": 0x1200, "__x64_sys_ni_syscall": 0x1300,
	"x64_sys_call": 0x2000, "ftrace_caller": 0x3000, "ftrace_regs_caller": 0x3100, "__fentry__": 0x3200,
	"__x86_return_thunk": 0x3300, "do_syscall_64": 0x4000, "asm_exc_divide_error": 0x5000, "asm_exc_page_fault": 0x5100,
}

type synthDispatch struct {
	mem sliceMem
	k   *Kernel
}

func (s *synthDispatch) va(name string) uint64 { return sdText + sdSyms[name] }

// pa is the physical address of kernel virtual address va in the image.
func (s *synthDispatch) pa(va uint64) uint64 { return sdPhys + va - sdText }

func newSynthDispatch(t testing.TB) *synthDispatch {
	mem := make(sliceMem, 8<<20)
	s := &synthDispatch{mem: mem}
	// Per-CPU symbols first, as genSymbols has them (the layout's
	// relative base is the first text symbol).
	syms := []genSym{{"fixed_percpu_data", 'D', 0}, {"irq_stack_backing_store", 'd', 0x4000}, {"_text", 'T', sdText}, {"_stext", 'T', sdText}}
	names := make([]string, 0, len(sdSyms))
	for n := range sdSyms {
		names = append(names, n)
	}
	// Symbols in address order; the ni_syscall wrappers share an address.
	for off := uint64(0); off < 0x6000; off += 0x100 {
		for _, n := range names {
			if sdSyms[n] == off {
				syms = append(syms, genSym{n, 'T', sdText + off})
			}
		}
		switch off {
		case 0x2000, 0x4000:
			// Ends x64_sys_call and do_syscall_64 early: less to decode.
			syms = append(syms, genSym{fmt.Sprintf("local_%x", off), 't', sdText + off + 0x40})
		case 0x1300:
			syms = append(syms, genSym{"__ia32_sys_ni_syscall", 'T', sdText + off})
		case 0x3000:
			syms = append(syms, genSym{"ftrace_caller_op_ptr", 'T', sdText + off + sdTemplate})
		case 0x3100:
			syms = append(syms, genSym{"ftrace_regs_caller_op_ptr", 'T', sdText + off + sdTemplate})
		}
	}
	for i := 0; i < 300; i++ {
		syms = append(syms, genSym{fmt.Sprintf("filler_%d", i), 't', sdText + 0x6000 + uint64(i)*0x40})
	}
	syms = append(syms, genSym{"digits_0123456789", 't', sdText + 0x10000}, genSym{"_etext", 'T', sdText + 0x20000},
		genSym{"sys_call_table", 'D', sdTable}, genSym{"vdso_mapping", 'd', sdTable + 5*8}, genSym{"_end", 'B', sdText + 2<<20})
	ks := parseGenerated(t, genTables(t, syms, genLayouts[5], 0xffffffff82000000), 0xffffffff82000000)

	le := binary.LittleEndian
	// sys_call_table: four system calls and a zero word of padding.
	for i, n := range []string{"__x64_sys_read", "__x64_sys_ni_syscall", "__x64_sys_kill", "__x64_sys_getpid"} {
		le.PutUint64(mem[s.pa(sdTable)+uint64(i)*8:], s.va(n))
	}
	// x64_sys_call: the ftrace NOP5, a jump label's NOP2, three cases and
	// a return thunk, then int3 padding.
	code := []byte{0x0f, 0x1f, 0x44, 0x00, 0x00, 0x66, 0x90}
	branch := func(op byte, to string) {
		at := sdX64 + uint64(len(code)) + 5
		code = le.AppendUint32(append(code, op), uint32(s.va(to)-at))
	}
	branch(0xe9, "__x64_sys_read")
	branch(0xe9, "__x64_sys_kill")
	branch(0xe8, "__x64_sys_getpid")
	branch(0xe9, "__x86_return_thunk")
	copy(mem[s.pa(sdX64):], append(code, bytes.Repeat([]byte{0xcc}, 0x40-len(code))...))
	// do_syscall_64 calls x64_sys_call.
	at := s.va("do_syscall_64")
	copy(mem[s.pa(at):], le.AppendUint32([]byte{0xe8}, uint32(sdX64-(at+5))))
	mem[s.pa(at)+5] = 0xc3
	// ftrace's callers, and a trampoline copied from ftrace_caller.
	for i := range sdTemplate {
		mem[s.pa(s.va("ftrace_caller"))+uint64(i)] = byte(0x41 + i)
		mem[s.pa(s.va("ftrace_regs_caller"))+uint64(i)] = byte(0x91 + i)
	}
	copy(mem[sdModPhys+sdTramp-sdModVA:], mem[s.pa(s.va("ftrace_caller")):][:sdTemplate])
	// The IDT: #DE and #PF present.
	for v, n := range map[int]string{0: "asm_exc_divide_error", 14: "asm_exc_page_fault"} {
		putGate(mem[sdIDTPhys+v*16:], s.va(n), true)
	}
	// Page tables for the module area page: PGD, PUD, PMD.
	pgd := uint64(5 << 20)
	le.PutUint64(mem[pgd+511*8:], (pgd+0x1000)|0x63)
	le.PutUint64(mem[pgd+0x1000+510*8:], (pgd+0x2000)|0x63)
	le.PutUint64(mem[pgd+0x2000+256*8:], sdModPhys|0x1e3)
	s.k = &Kernel{Record: Record{TextVA: sdText, PhysBase: sdPhys, Levels: 4, PageOffsetBase: sdPageOff},
		Mem: mem, AS: guestmem.NewAddressSpace(mem, pgd, 4), Syms: ks, imageSize: 2 << 20, ramEnd: uint64(len(mem))}
	return s
}

// putGate writes a present (or not) 64-bit interrupt gate to h.
func putGate(b []byte, h uint64, present bool) {
	le := binary.LittleEndian
	le.PutUint16(b[0:], uint16(h))
	le.PutUint16(b[2:], 0x10)
	b[5] = 0x0e
	if present {
		b[5] |= 0x80
	}
	le.PutUint16(b[6:], uint16(h>>16))
	le.PutUint32(b[8:], uint32(h>>32))
}

// read reads the dispatch with bytes overlaid at kernel virtual addresses
// of the image, the module page or the direct map.
func (s *synthDispatch) read(t testing.TB, patches map[uint64][]byte) *Dispatch {
	t.Helper()
	m := &patchedMem{base: s.mem}
	for va, b := range patches {
		pa := s.pa(va)
		switch {
		case va >= sdModVA:
			pa = sdModPhys + va - sdModVA
		case va >= sdPageOff && va < sdPageOff+uint64(len(s.mem)):
			pa = va - sdPageOff
		}
		m.patches = append(m.patches, memPatch{pa, b})
	}
	d, err := s.k.On(m).ReadDispatch(sdPageOff + sdIDTPhys)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func rel32To(from, to uint64) []byte { return binary.LittleEndian.AppendUint32(nil, uint32(to-from)) }

func TestDispatchSynthetic(t *testing.T) {
	s := newSynthDispatch(t)
	d := s.read(t, nil)
	if len(d.Tables) != 1 || len(d.Tables[0].Entries) != 4 {
		t.Fatalf("tables %+v: want sys_call_table with 4 entries (the padding dropped)", d.Tables)
	}
	x64 := findFunction(d, "x64_sys_call")
	if x64 == nil || x64.Size != 0x40 || len(x64.Calls) != 4 || x64.Calls[2] != (CallSite{Offset: 17, Target: s.va("__x64_sys_getpid"), Insn: "call"}) {
		t.Fatalf("x64_sys_call: %+v", x64)
	}
	if len(d.IDT) != 256 || !d.IDT[14].Present || d.IDT[14].Handler != s.va("asm_exc_page_fault") || d.IDT[1].Present {
		t.Fatalf("IDT: %+v", d.IDT[:16])
	}
	if got := s.k.Judge(d); len(got) != 0 {
		t.Errorf("clean: %+v", got)
	}
	hex := func(v uint64) string { return fmt.Sprintf("%#x", v) }
	gate := make([]byte, 16)
	filler3 := uint64(sdText + 0x6000 + 3*0x40)
	putGate(gate, filler3, true)
	for _, c := range []struct {
		name           string
		patches        map[uint64][]byte
		judge, compare []Deviation
	}{
		{name: "traced through a trampoline",
			patches: map[uint64][]byte{sdX64: append([]byte{0xe8}, rel32To(sdX64+5, sdTramp)...)},
			judge:   []Deviation{{What: "x64_sys_call+0x0", Kind: "runtime_patch", Current: hex(sdTramp), CurrentSymbol: "ftrace_trampoline [__builtin__ftrace]"}},
			compare: []Deviation{{What: "x64_sys_call+0x0", Kind: "runtime_patch", Current: "e8" + fmt.Sprintf("%x", rel32To(sdX64+5, sdTramp)), CurrentSymbol: "ftrace_trampoline [__builtin__ftrace]", Baseline: "0f1f440000"}}},
		{name: "jump label enabled",
			patches: map[uint64][]byte{sdX64 + 5: {0xeb, 0x10}},
			compare: []Deviation{{What: "x64_sys_call+0x5", Kind: "runtime_patch", Current: "eb10", CurrentSymbol: "x64_sys_call+0x17", Baseline: "6690"}}},
		{name: "NOP5 made a call into the module area",
			patches: map[uint64][]byte{sdX64: append([]byte{0xe8}, rel32To(sdX64+5, sdEvil)...)},
			judge:   []Deviation{{What: "x64_sys_call+0x0", Kind: "call_target", Current: hex(sdEvil)}},
			compare: []Deviation{{What: "x64_sys_call+0x0", Kind: "code", Current: "e8" + fmt.Sprintf("%x", rel32To(sdX64+5, sdEvil)), Baseline: "0f1f440000"}}},
		{name: "call retargeted",
			patches: map[uint64][]byte{sdX64 + 18: rel32To(sdX64+22, sdEvil)},
			judge:   []Deviation{{What: "x64_sys_call+0x11", Kind: "call_target", Current: hex(sdEvil)}},
			compare: []Deviation{{What: "x64_sys_call+0x11", Kind: "call_target", Current: hex(sdEvil), Baseline: hex(s.va("__x64_sys_getpid")), BaselineSymbol: "__x64_sys_getpid+0x0"}}},
		{name: "inline hook over two instructions",
			// movabs rax, evil; jmp rax over the first two cases.
			patches: map[uint64][]byte{sdX64 + 7: append(binary.LittleEndian.AppendUint64([]byte{0x48, 0xb8}, sdEvil), 0xff, 0xe0)},
			// Two pieces: the movabs over both jmps, and the jmp rax
			// over the start of the call (the rest of which now
			// decodes as other instructions).
			judge: []Deviation{},
			compare: []Deviation{
				{What: "x64_sys_call+0x7", Kind: "code", Current: fmt.Sprintf("48b8%x", binary.LittleEndian.AppendUint64(nil, sdEvil)),
					Baseline: fmt.Sprintf("e9%xe9%x", rel32To(sdX64+12, s.va("__x64_sys_read")), rel32To(sdX64+17, s.va("__x64_sys_kill"))), BaselineSymbol: "__x64_sys_read+0x0"},
				{What: "x64_sys_call+0x11", Kind: "code", Current: fmt.Sprintf("ffe0%x", rel32To(sdX64+22, s.va("__x64_sys_getpid"))[1:]),
					Baseline: fmt.Sprintf("e8%x", rel32To(sdX64+22, s.va("__x64_sys_getpid"))), BaselineSymbol: "__x64_sys_getpid+0x0"},
			}},
		{name: "table entry into a function's middle",
			patches: map[uint64][]byte{sdTable + 8: binary.LittleEndian.AppendUint64(nil, s.va("__x64_sys_kill")+1)},
			judge:   []Deviation{{What: "sys_call_table[1]", Kind: "table", Current: hex(s.va("__x64_sys_kill") + 1), CurrentSymbol: "__x64_sys_kill+0x1"}},
			compare: []Deviation{{What: "sys_call_table[1]", Kind: "table", Current: hex(s.va("__x64_sys_kill") + 1), CurrentSymbol: "__x64_sys_kill+0x1", Baseline: hex(s.va("__x64_sys_ni_syscall")), BaselineSymbol: "__x64_sys_ni_syscall+0x0"}}},
		{name: "last entry zeroed",
			patches: map[uint64][]byte{sdTable + 24: make([]byte, 8)},
			judge:   []Deviation{},
			compare: []Deviation{{What: "sys_call_table[3]", Kind: "table", Current: "0x0", Baseline: hex(s.va("__x64_sys_getpid")), BaselineSymbol: "__x64_sys_getpid+0x0"}}},
		{name: "IDT gate moved within text",
			patches: map[uint64][]byte{sdPageOff + sdIDTPhys + 14*16: gate},
			judge:   []Deviation{},
			compare: []Deviation{{What: "idt[14]", Kind: "idt", Current: hex(filler3), CurrentSymbol: "filler_3+0x0", Baseline: hex(s.va("asm_exc_page_fault")), BaselineSymbol: "asm_exc_page_fault+0x0"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cur := s.read(t, c.patches)
			if c.judge != nil {
				checkDeviations(t, "Judge", s.k.Judge(cur), c.judge)
			}
			checkDeviations(t, "Compare", Compare(d, cur, s.k), c.compare)
		})
	}
}

// TestCompareHostile feeds Compare and Judge readings that do not match.
func TestCompareHostile(t *testing.T) {
	s := newSynthDispatch(t)
	d := s.read(t, nil)
	if got := Compare(nil, d, s.k); len(got) != 0 {
		t.Errorf("nil baseline: %+v", got)
	}
	if got := s.k.Judge(nil); got == nil || len(got) != 0 {
		t.Errorf("Judge(nil) = %#v, want []", got)
	}
	short := *d
	short.Functions = append([]FunctionCode(nil), d.Functions...)
	short.Functions[0] = newFunctionCode(d.Functions[0].Name, d.Functions[0].Addr, d.Functions[0].Code[:10])
	short.Tables = nil
	got := Compare(d, &short, nil)
	if len(got) != 2 || got[0].What != "sys_call_table" || !strings.HasPrefix(got[1].What, "x64_sys_call+") {
		t.Errorf("shorter reading without symbols: %+v", got)
	}
}

// FuzzCompare compares arbitrary code bytes with x64_sys_call's real ones
// and with each other, and judges them: no panic, and every deviation
// names the function at an offset inside it, of a known kind.
func FuzzCompare(f *testing.F) {
	s := newSynthDispatch(f)
	d := s.read(f, nil)
	x64 := findFunction(d, "x64_sys_call")
	f.Add(x64.Code[:64], x64.Code[:64])
	f.Add(x64.Code[:64], append([]byte{0xe8, 0, 0x10, 0, 0}, x64.Code[5:64]...))
	f.Add([]byte{0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0, 0}, []byte{0xf3, 0x0f, 0x1e, 0xfa, 0xe8, 1, 2, 3, 4})
	f.Add([]byte{}, []byte{0x66})
	kinds := map[string]bool{"code": true, "call_target": true, "runtime_patch": true, "table": true, "idt": true}
	f.Fuzz(func(t *testing.T, base, cur []byte) {
		base, cur = base[:min(len(base), 4096)], cur[:min(len(cur), 4096)]
		b := &Dispatch{Functions: []FunctionCode{newFunctionCode("x64_sys_call", sdX64, base)}}
		c := &Dispatch{Functions: []FunctionCode{newFunctionCode("x64_sys_call", sdX64, cur)}}
		if got := Compare(b, b, s.k); len(got) != 0 {
			t.Fatalf("Compare with itself: %+v", got)
		}
		got := Compare(b, c, s.k)
		if bytes.Equal(base, cur) != (len(got) == 0) {
			t.Fatalf("equal %v, %d deviations", bytes.Equal(base, cur), len(got))
		}
		n := max(len(base), len(cur))
		for _, dv := range append(got, s.k.Judge(c)...) {
			var off int
			if _, err := fmt.Sscanf(dv.What, "x64_sys_call+%v", &off); err != nil || off < 0 || off >= n || !kinds[dv.Kind] {
				t.Fatalf("deviation %+v (code of %d bytes)", dv, n)
			}
		}
		for _, cs := range c.Functions[0].Calls {
			if cs.Offset >= uint64(len(cur)) {
				t.Fatalf("call site %+v past the code", cs)
			}
		}
	})
}

// FuzzJudge lays arbitrary bytes over sys_call_table, x64_sys_call and
// the IDT of the synthetic kernel, reads the dispatch and judges it.
func FuzzJudge(f *testing.F) {
	s := newSynthDispatch(f)
	m := []byte(s.mem)
	f.Add(m[s.pa(sdTable):][:40], m[s.pa(sdX64):][:64], m[sdIDTPhys:][:256])
	f.Add([]byte{}, []byte{0xe9, 0xff, 0xff, 0xff, 0x7f}, bytes.Repeat([]byte{0xff}, 32))
	f.Fuzz(func(t *testing.T, table, code, idt []byte) {
		p := map[uint64][]byte{
			sdTable:               table[:min(len(table), 8*64)],
			sdX64:                 code[:min(len(code), 0x1000)],
			sdPageOff + sdIDTPhys: idt[:min(len(idt), 4096)],
		}
		d := s.read(t, p)
		for _, dv := range s.k.Judge(d) {
			if dv.What == "" || dv.Current == "" {
				t.Fatalf("deviation %+v", dv)
			}
		}
		Compare(d, s.read(t, nil), s.k)
	})
}
