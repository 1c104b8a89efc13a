package introspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"sort"
	"testing"
)

// The real kernels the discover tests boot cover two layouts (Debian 6.1:
// base-relative with absolute per-CPU symbols and seqs_of_names; 7.x:
// PC-relative). The other layouts of scripts/kallsyms.c are built here,
// table by table as that script writes them, and read back.

type genSym struct {
	name string
	typ  byte
	addr uint64
}

// genLayout names a scripts/kallsyms.c output format.
type genLayout struct {
	name      string
	align     int
	addrs     string // "absolute", "base-relative", "pc-relative"
	percpu    bool   // CONFIG_KALLSYMS_ABSOLUTE_PERCPU
	after     bool   // 6.4+ order
	seqs      int    // bytes per seqs_of_names entry, 0 for none
	markersSz int
}

var genLayouts = []genLayout{
	{name: "4.4 absolute", align: 8, addrs: "absolute", markersSz: 8},
	{name: "4.19 base-relative", align: 8, addrs: "base-relative", percpu: true, markersSz: 4},
	{name: "6.1 base-relative no percpu", align: 8, addrs: "base-relative", markersSz: 4},
	{name: "6.2 seqs u32", align: 8, addrs: "base-relative", percpu: true, seqs: 4, markersSz: 4},
	{name: "6.3 seqs 3-byte", align: 8, addrs: "base-relative", percpu: true, seqs: 3, markersSz: 4},
	{name: "6.4 after", align: 8, addrs: "base-relative", percpu: true, after: true, seqs: 3, markersSz: 4},
	{name: "6.15 after no percpu", align: 8, addrs: "base-relative", after: true, seqs: 3, markersSz: 4},
	{name: "7.x pc-relative", align: 4, addrs: "pc-relative", after: true, seqs: 3, markersSz: 4},
}

// genSymbols makes n symbols sorted by address: a few per-CPU ones at
// small addresses, then text and data; names use every digit (so the
// token table has them as single characters) and repeat some names.
func genSymbols(n int) []genSym {
	syms := []genSym{{"fixed_percpu_data", 'D', 0}, {"irq_stack_backing_store", 'd', 0x4000}}
	words := []string{"init", "task", "sched", "mm", "vfs", "read", "write", "page", "irq", "kmalloc", "do", "sys"}
	addr := uint64(0xffffffff81000000)
	syms = append(syms, genSym{"_text", 'T', addr}, genSym{"_stext", 'T', addr})
	for i := 0; len(syms) < n; i++ {
		name := fmt.Sprintf("%s_%s%d", words[i%len(words)], words[(i/7)%len(words)], i%1000)
		if i%97 == 0 {
			name = "static_dup" // same name at several addresses
		}
		if i%131 == 0 {
			// A name longer than 127 bytes: 2-byte length (6.1+).
			name = fmt.Sprintf("long_%0150d", i)
		}
		addr += uint64(16 + i%48)
		typ := byte('t')
		if i%5 == 0 {
			typ = 'T'
		}
		syms = append(syms, genSym{name, typ, addr})
	}
	syms = append(syms, genSym{"digits_0123456789", 'T', addr + 64}, genSym{"init_task", 'D', addr + 0x10000})
	return syms
}

// genTables writes the kallsyms tables for syms in layout l, at virtual
// address base (the start of the returned buffer). It returns the
// buffer and the offset of kallsyms_offsets for PC-relative layouts.
func genTables(t testing.TB, syms []genSym, l genLayout, base uint64) []byte {
	// Token table: every byte used raw is its own token; unused codes
	// get frequent pairs, so names compress as the kernel's do.
	used := map[byte]bool{}
	for _, s := range syms {
		used[s.typ] = true
		for i := 0; i < len(s.name); i++ {
			used[s.name[i]] = true
		}
	}
	var tokens [256]string
	pairs := []string{"in", "it", "_t", "as", "k_", "sc", "he", "ed", "mm", "_s", "ys", "re", "ad", "wr", "pa", "ge", "ir", "km", "al", "oc", "do", "st", "at", "ic"}
	pi := 0
	for c := 0; c < 256; c++ {
		switch {
		case used[byte(c)]:
			tokens[c] = string(rune(c))
		case pi < len(pairs) && c != 0:
			tokens[c] = pairs[pi]
			pi++
		}
	}
	encode := func(s string) []byte {
		var out []byte
		for i := 0; i < len(s); {
			best := -1
			for c := range tokens {
				if len(tokens[c]) == 2 && i+2 <= len(s) && s[i:i+2] == tokens[c] {
					best = c
					break
				}
			}
			if best >= 0 {
				out = append(out, byte(best))
				i += 2
				continue
			}
			out = append(out, s[i])
			i++
		}
		return out
	}

	var b bytes.Buffer
	b.Write(bytes.Repeat([]byte{0xcc}, 64)) // unrelated data before
	label := func() int {
		for b.Len()%l.align != 0 {
			b.WriteByte(0)
		}
		return b.Len()
	}
	le32 := func(v uint32) { b.Write(binary.LittleEndian.AppendUint32(nil, v)) }
	le64 := func(v uint64) { b.Write(binary.LittleEndian.AppendUint64(nil, v)) }
	relBase := syms[0].addr
	if l.percpu {
		relBase = syms[2].addr // lowest non-per-CPU address
	}
	addresses := func() {
		at := label()
		switch l.addrs {
		case "absolute":
			for _, s := range syms {
				le64(s.addr)
			}
		case "base-relative":
			for _, s := range syms {
				var off int64
				if l.percpu && s.addr < 0x100000 {
					off = int64(s.addr)
				} else if l.percpu {
					off = int64(relBase) - int64(s.addr) - 1
				} else {
					off = int64(s.addr - relBase)
				}
				le32(uint32(off))
			}
			label()
			le64(relBase)
		case "pc-relative":
			for i, s := range syms {
				le32(uint32(int64(s.addr) - int64(base+uint64(at+4*i))))
			}
		}
	}
	byName := make([]int, len(syms))
	for i := range byName {
		byName[i] = i
	}
	sort.SliceStable(byName, func(i, j int) bool { return syms[byName[i]].name < syms[byName[j]].name })
	seqs := func() {
		if l.seqs == 0 {
			return
		}
		label()
		for _, q := range byName {
			if l.seqs == 3 {
				b.Write([]byte{byte(q >> 16), byte(q >> 8), byte(q)})
			} else {
				le32(uint32(q))
			}
		}
	}
	if !l.after {
		addresses()
	}
	label()
	if l.markersSz == 8 {
		le64(uint64(len(syms)))
	} else {
		le32(uint32(len(syms)))
	}
	namesAt := label()
	var markers []int
	for i, s := range syms {
		if i%256 == 0 {
			markers = append(markers, b.Len()-namesAt)
		}
		e := encode(string(s.typ) + s.name)
		if len(e) > 0x7f {
			b.Write([]byte{byte(len(e)&0x7f | 0x80), byte(len(e) >> 7)})
		} else {
			b.WriteByte(byte(len(e)))
		}
		b.Write(e)
	}
	label()
	for _, m := range markers {
		if l.markersSz == 8 {
			le64(uint64(m))
		} else {
			le32(uint32(m))
		}
	}
	if !l.after {
		seqs()
	}
	tt := label()
	var index [256]int
	for c, tok := range tokens {
		index[c] = b.Len() - tt
		b.WriteString(tok)
		b.WriteByte(0)
	}
	label()
	for _, v := range index {
		b.Write(binary.LittleEndian.AppendUint16(nil, uint16(v)))
	}
	if l.after {
		addresses()
		seqs()
	}
	b.Write(bytes.Repeat([]byte{0xcc}, 64)) // unrelated data after
	return b.Bytes()
}

func parseGenerated(t testing.TB, buf []byte, base uint64) *Kallsyms {
	t.Helper()
	hit := bytes.Index(buf, tokenDigits)
	if hit < 0 {
		t.Fatal("generated table has no digit tokens")
	}
	ks, err := parseKallsyms(buf, hit)
	if err != nil {
		t.Fatal(err)
	}
	if ks.relative {
		ks.relocate(base + uint64(ks.tableOff))
	}
	return ks
}

func TestKallsymsLayouts(t *testing.T) {
	syms := genSymbols(3000)
	const base = 0xffffffff82000000
	for _, l := range genLayouts {
		t.Run(l.name, func(t *testing.T) {
			syms := slices.Clone(syms)
			if !l.percpu && l.addrs != "absolute" {
				// Per-CPU symbols are ordinary kernel addresses.
				syms[0].addr, syms[1].addr = 0xffffffff80f00000, 0xffffffff80f04000
			}
			ks := parseGenerated(t, genTables(t, syms, l, base), base)
			if ks.Len() != len(syms) {
				t.Fatalf("%d symbols, want %d", ks.Len(), len(syms))
			}
			if (ks.seqs != nil) != (l.seqs != 0) {
				t.Errorf("seqs_of_names found: %v, layout has them: %v", ks.seqs != nil, l.seqs != 0)
			}
			for i, s := range syms {
				got := ks.Symbol(i)
				if got.Name != s.name || got.Addr != s.addr || got.Type != s.typ {
					t.Fatalf("symbol %d = %+v, want %+v", i, got, s)
				}
			}
			for _, s := range syms[2:] {
				if s.name == "static_dup" {
					continue
				}
				if a, ok := ks.Lookup(s.name); !ok || a != s.addr {
					t.Fatalf("Lookup(%s) = %#x, %v; want %#x", s.name, a, ok, s.addr)
				}
			}
			// Equal names: the lowest address, as kallsyms_lookup_name.
			var first uint64
			for _, s := range syms {
				if s.name == "static_dup" {
					first = s.addr
					break
				}
			}
			if a, ok := ks.Lookup("static_dup"); !ok || a != first {
				t.Errorf("Lookup(static_dup) = %#x, %v; want %#x", a, ok, first)
			}
			if _, ok := ks.Lookup("no_such_symbol"); ok {
				t.Error("Lookup(no_such_symbol) found something")
			}
			it, _ := ks.Lookup("init_task")
			if name, off, ok := ks.At(syms[100].addr + 3); !ok || name != syms[100].name || off != 3 {
				t.Errorf("At(sym 100 + 3) = %s+%d %v", name, off, ok)
			}
			if it != syms[len(syms)-1].addr {
				t.Errorf("init_task = %#x", it)
			}
		})
	}
}

// TestKallsymsRejects checks that damaged tables give errors, not
// wrong symbols.
func TestKallsymsRejects(t *testing.T) {
	syms := genSymbols(1000)
	l := genLayouts[4]
	good := genTables(t, syms, l, 0)
	hit := bytes.Index(good, tokenDigits)
	for _, tc := range []struct {
		name string
		mod  func(b []byte)
	}{
		{"token index", func(b []byte) {
			tt, _ := findTokenTable(b, hit)
			b[tt.index+2*0x31]++
		}},
		{"marker", func(b []byte) {
			tt, _ := findTokenTable(b, hit)
			nm, _ := findNames(b, tt)
			b[nm.markers+4]++
		}},
		{"num_syms", func(b []byte) {
			tt, _ := findTokenTable(b, hit)
			nm, _ := findNames(b, tt)
			binary.LittleEndian.PutUint32(b[nm.numSymsAt:], uint32(len(syms)+1))
		}},
		{"unsorted offsets", func(b []byte) {
			tt, _ := findTokenTable(b, hit)
			nm, _ := findNames(b, tt)
			at := nm.numSymsAt - 8 - alignUp(4*len(syms), 8)
			copy(b[at+400:at+404], []byte{0x10, 0, 0, 0})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(good)
			tc.mod(b)
			ks, err := parseKallsyms(b, hit)
			if err == nil {
				// A damaged marker may leave a table that still parses
				// only if every symbol reads back right.
				for i, s := range syms {
					if got := ks.Symbol(i); got.Name != s.name || got.Addr != s.addr {
						t.Fatalf("damaged table parsed with wrong symbol %d: %+v", i, got)
					}
				}
				t.Fatalf("damaged table parsed")
			}
			t.Log(err)
		})
	}
}

// textOnly returns the symbols of s that scripts/kallsyms keeps without
// --all-symbols (CONFIG_KALLSYMS_ALL off): those in _stext.._etext and
// _sinittext.._einittext.
func textOnly(s *Kallsyms) *Kallsyms {
	f := &Kallsyms{names: s.names, tokens: s.tokens, layout: s.layout, relative: s.relative, tableOff: s.tableOff}
	get := func(n string) uint64 { v, _ := s.Lookup(n); return v }
	ranges := [][2]uint64{{get("_stext"), get("_etext")}, {get("_sinittext"), get("_einittext")}}
	for i, a := range s.addrs {
		for _, r := range ranges {
			if a >= r[0] && a <= r[1] && r[0] != 0 {
				f.entry = append(f.entry, s.entry[i])
				f.addrs = append(f.addrs, a)
				break
			}
		}
	}
	return f
}
