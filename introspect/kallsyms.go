package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
)

// The kernel's symbol table (CONFIG_KALLSYMS) is a set of tables that
// scripts/kallsyms.c emits into .rodata and kernel/kallsyms.c reads:
//
//	kallsyms_num_syms      u32 (a pointer-sized word before 4.6)
//	kallsyms_names         per symbol: length (1 byte, or 2 as ULEB128
//	                       since 6.1), then that many token numbers; the
//	                       first expanded character is the symbol type
//	kallsyms_markers       u32 offset into names of every 256th symbol
//	kallsyms_seqs_of_names symbol numbers sorted by name (6.2+)
//	kallsyms_token_table   256 NUL-terminated strings
//	kallsyms_token_index   256 u16 offsets into the token table
//	kallsyms_offsets       s32 per symbol, relative to
//	kallsyms_relative_base (CONFIG_KALLSYMS_BASE_RELATIVE, 4.6+; with
//	                       CONFIG_KALLSYMS_ABSOLUTE_PERCPU non-negative
//	                       offsets are absolute, the rest base-1-offset),
//	                       or relative to the offset's own address (7.x,
//	                       no relative base), or
//	kallsyms_addresses     one absolute pointer per symbol
//
// Before 6.4 the addresses came first and seqs_of_names sat between the
// markers and the token table; 6.4 ("kallsyms: change the output order")
// moved the offsets, the relative base and seqs_of_names after the token
// index. Labels are aligned to 8 bytes on 64-bit kernels, to 4 in 7.x.
// Before 7.x the kallsyms_* labels themselves are not in the table, so
// the tables are found by their structure, as vmlinux-to-elf does.
// Verified on real kernels: Debian 6.1 (base-relative, absolute per-CPU,
// seqs_of_names backported), Debian 6.12 (6.4+ order), 7.1 (PC-relative);
// the other layouts on tables built as scripts/kallsyms.c writes them
// (kallsyms_test.go).

// Bounds on what a real kernel's tables hold; anything outside is not a
// kallsyms table (or is forged).
const (
	ksymNameLen = 512     // KSYM_NAME_LEN since 6.1 (128 before)
	maxTokenLen = 256     // a token expands to at most this many bytes
	minNumSyms  = 256     // a kernel has thousands of symbols
	maxNumSyms  = 1 << 22 // allyesconfig has ~400k
)

// tokenDigits is how tokens 0x30..0x39 look in kallsyms_token_table: the
// digits are used as plain characters in symbol names, so each one is its
// own single-character token, in order.
var tokenDigits = []byte("0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00")

// Symbol is one kernel symbol.
type Symbol struct {
	Name string
	Addr uint64
	// Type is nm's type letter: T/t text, D/d data, R/r read-only data,
	// B/b bss, A absolute, ...
	Type byte
}

// Kallsyms is the kernel's symbol table as read from guest memory.
//
// Names stay compressed as the kernel keeps them and are expanded on use:
// a 7.x kernel has over 250k symbols, and expanding them all would cost
// more than the rest of discovery. Lookups by name use the kernel's own
// name index (kallsyms_seqs_of_names, 6.2+) when it is there, else a map
// built on first use.
type Kallsyms struct {
	names  []byte      // kallsyms_names
	tokens [256][]byte // kallsyms_token_table
	entry  []uint32    // offset of each symbol's entry in names
	addrs  []uint64    // in table order, sorted by address
	seqs   []uint32    // symbol numbers sorted by name, nil when absent

	once   sync.Once
	byName map[string]int // when seqs is nil: first symbol of each name

	layout string
	// relative is set while the addresses are still relative to
	// kallsyms_offsets[0] (tableOff in the parsed buffer).
	relative bool
	tableOff int
}

// Len returns the number of symbols.
func (s *Kallsyms) Len() int { return len(s.addrs) }

// Symbol returns symbol i, in address order.
func (s *Kallsyms) Symbol(i int) Symbol {
	var buf [ksymNameLen]byte
	b := s.expand(i, buf[:0])
	if len(b) == 0 {
		return Symbol{Addr: s.addrs[i]}
	}
	return Symbol{Type: b[0], Name: string(b[1:]), Addr: s.addrs[i]}
}

// Layout describes which kallsyms table layout was found, e.g.
// "6.4+ base-relative".
func (s *Kallsyms) Layout() string { return s.layout }

// expand appends the expanded entry i (type character, then name) to
// dst, at most ksymNameLen bytes.
func (s *Kallsyms) expand(i int, dst []byte) []byte {
	d, l, ok := nameEntry(s.names, int(s.entry[i]))
	if !ok {
		return dst
	}
	for _, t := range s.names[d : d+l] {
		tok := s.tokens[t]
		if len(dst)+len(tok) > ksymNameLen {
			break
		}
		dst = append(dst, tok...)
	}
	return dst
}

// nameIs reports how the name of symbol i compares with name.
func (s *Kallsyms) compare(i int, name string) int {
	var buf [ksymNameLen]byte
	b := s.expand(i, buf[:0])
	if len(b) > 0 {
		b = b[1:]
	}
	return strings.Compare(string(b), name)
}

// Lookup returns the address of the symbol name. Like
// kallsyms_lookup_name, it returns the lowest address when several
// symbols (static functions in different files) share the name.
func (s *Kallsyms) Lookup(name string) (uint64, bool) {
	if s.seqs != nil {
		// seqs_of_names orders equal names by address.
		j := sort.Search(len(s.seqs), func(j int) bool { return s.compare(int(s.seqs[j]), name) >= 0 })
		if j < len(s.seqs) && s.compare(int(s.seqs[j]), name) == 0 {
			return s.addrs[s.seqs[j]], true
		}
		return 0, false
	}
	s.once.Do(s.buildMap)
	i, ok := s.byName[name]
	if !ok {
		return 0, false
	}
	return s.addrs[i], true
}

// buildMap indexes every name, for kernels without seqs_of_names.
func (s *Kallsyms) buildMap() {
	s.byName = make(map[string]int, len(s.addrs))
	var buf [ksymNameLen]byte
	// Backwards, so that the first (lowest) of equal names wins.
	for i := len(s.addrs) - 1; i >= 0; i-- {
		b := s.expand(i, buf[:0])
		if len(b) > 1 {
			s.byName[string(b[1:])] = i
		}
	}
}

// At returns the symbol containing va and the offset of va into it: the
// last symbol at or below va, as kallsyms_lookup does. Symbols have no
// size in the table; va past the last symbol is not found.
func (s *Kallsyms) At(va uint64) (name string, off uint64, ok bool) {
	i := sort.Search(len(s.addrs), func(i int) bool { return s.addrs[i] > va })
	if i == 0 || i == len(s.addrs) {
		return "", 0, false
	}
	sym := s.Symbol(i - 1)
	return sym.Name, va - sym.Addr, true
}

// tokenTable is kallsyms_token_table decoded.
type tokenTable struct {
	tokens [256][]byte
	start  int // offset of kallsyms_token_table in the buffer
	index  int // offset of kallsyms_token_index
}

// findTokenTable returns the kallsyms token table around a hit of
// tokenDigits at hit, or an error when the bytes there are not one.
func findTokenTable(buf []byte, hit int) (*tokenTable, error) {
	// Walk forward over tokens 0x30..0xff to the end of the table.
	p := hit
	for i := 0x30; i < 256; i++ {
		e := bytes.IndexByte(buf[p:min(len(buf), p+maxTokenLen)], 0)
		if e < 0 {
			return nil, fmt.Errorf("token %#x at %#x: no NUL within %d bytes", i, p, maxTokenLen)
		}
		p += e + 1
	}
	end := p
	// kallsyms_token_index follows, aligned; older assemblers may have
	// used a smaller alignment, so try each.
	for _, align := range []int{8, 4, 2, 1} {
		ti := alignUp(end, align)
		if ti+512 > len(buf) {
			continue
		}
		var index [256]int
		for i := range index {
			index[i] = int(binary.LittleEndian.Uint16(buf[ti+2*i:]))
		}
		if index[0] != 0 {
			continue
		}
		start := hit - index[0x30]
		if start < 0 || start+index[255] >= end {
			continue
		}
		t := &tokenTable{start: start, index: ti}
		ok := true
		q := start
		for i := 0; i < 256 && ok; i++ {
			if q != start+index[i] {
				ok = false
				break
			}
			e := bytes.IndexByte(buf[q:min(end, q+maxTokenLen)], 0)
			if e < 0 {
				ok = false
				break
			}
			t.tokens[i] = buf[q : q+e]
			q += e + 1
		}
		if ok && q == end {
			return t, nil
		}
	}
	return nil, fmt.Errorf("no kallsyms_token_index after token table ending at %#x", end)
}

// names is kallsyms_names located and checked against kallsyms_markers.
type names struct {
	align     int // label alignment: 8 (ALGN on 64-bit), 4 in 7.x
	numSymsAt int // offset of kallsyms_num_syms
	start     int // offset of kallsyms_names
	end       int // first byte after the last name
	markers   int // offset of kallsyms_markers
	markersSz int // 4 bytes per marker, 8 in old kernels
	n         int
}

// nameEntry decodes the length prefix of the name at p: 1 byte, or 2
// bytes ULEB128 when the high bit of the first is set (6.1+, "big"
// symbols). It returns the offset of the token bytes and their count.
func nameEntry(buf []byte, p int) (data, length int, ok bool) {
	if p < 0 || p >= len(buf) {
		return 0, 0, false
	}
	l := int(buf[p])
	p++
	if l&0x80 != 0 {
		if p >= len(buf) {
			return 0, 0, false
		}
		l = l&0x7f | int(buf[p])<<7
		p++
	}
	if l == 0 || l > ksymNameLen || p+l > len(buf) {
		return 0, 0, false
	}
	return p, l, true
}

// checkNames tests whether kallsyms_num_syms is at off, its labels
// aligned to align: n names follow, and kallsyms_markers after them
// record the offset of every 256th.
func checkNames(buf []byte, tt *tokenTable, off, align, limit int, budget *int) (*names, bool) {
	if off < 0 || off+align > limit || off%align != 0 {
		return nil, false
	}
	n := int(binary.LittleEndian.Uint32(buf[off:]))
	if n < minNumSyms || n > maxNumSyms {
		return nil, false
	}
	// With 8-byte alignment the upper half is zero whether num_syms is
	// a u32 followed by padding or (before 4.6) a u64.
	if align == 8 && binary.LittleEndian.Uint32(buf[off+4:]) != 0 {
		return nil, false
	}
	start := off + align
	// Cheap test first: the first names must expand to a type letter.
	for i, p := 0, start; i < min(n, 8); i++ {
		d, l, ok := nameEntry(buf[:limit], p)
		if !ok || !isSymType(tt.tokens[buf[d]]) {
			return nil, false
		}
		p = d + l
	}
	p := start
	nm := (n + 255) / 256
	var firstMarkers [3]int
	for i := 0; i < n; i++ {
		if *budget--; *budget < 0 {
			return nil, false
		}
		if i&0xff == 0 && i>>8 < len(firstMarkers) {
			firstMarkers[i>>8] = p - start
		}
		d, l, ok := nameEntry(buf[:limit], p)
		if !ok {
			return nil, false
		}
		p = d + l
	}
	end := p
	m := alignUp(end, align)
	for _, sz := range []int{4, 8} {
		if m+nm*sz > limit {
			continue
		}
		ok := true
		for i := 0; i < min(nm, len(firstMarkers)); i++ {
			if readUint(buf[m+i*sz:], sz) != uint64(firstMarkers[i]) {
				ok = false
				break
			}
		}
		// The markers must be increasing and inside the names.
		prev := int64(-1)
		for i := 0; i < nm && ok; i++ {
			v := readUint(buf[m+i*sz:], sz)
			if v >= uint64(end-start) || int64(v) <= prev {
				ok = false
			}
			prev = int64(v)
		}
		if ok {
			return &names{align: align, numSymsAt: off, start: start, end: end, markers: m, markersSz: sz, n: n}, true
		}
	}
	return nil, false
}

// findNames looks backwards from the token table for kallsyms_num_syms.
func findNames(buf []byte, tt *tokenTable) (*names, error) {
	// Between num_syms and the token table lie the names (~20 bytes per
	// symbol), the markers and, in 6.2-6.3, seqs_of_names; scan back as
	// far as the buffer goes.
	// Walks from wrong candidates inside the names run on until they
	// fail; the budget keeps forged data from making that quadratic.
	budget := 4*len(buf) + 1<<20
	for off := alignDown(tt.start-8, 4); off >= 0; off -= 4 {
		for _, align := range []int{8, 4} {
			if n, ok := checkNames(buf, tt, off, align, tt.start, &budget); ok {
				return n, nil
			}
		}
		if budget < 0 {
			return nil, errors.New("kallsyms_names: search budget exhausted")
		}
	}
	return nil, errors.New("kallsyms_num_syms/kallsyms_names not found before the token table")
}

// isSymType reports whether tok starts with an nm type letter, as the
// first token of every kallsyms name does.
func isSymType(tok []byte) bool {
	return len(tok) > 0 && bytes.IndexByte([]byte("ABCDGNRSTUVWabcdgnrstuvw"), tok[0]) >= 0
}

// addrKind is how a layout stores symbol addresses.
type addrKind int

const (
	// kallsyms_addresses: one absolute pointer per symbol.
	addrAbsolute addrKind = iota
	// kallsyms_offsets + kallsyms_relative_base
	// (CONFIG_KALLSYMS_BASE_RELATIVE, 4.6 to 6.x).
	addrBaseRelative
	// kallsyms_offsets relative to their own address, no relative base
	// (7.x).
	addrPCRelative
)

// addrLayout is one place and way the kernel may have stored the
// symbol addresses.
type addrLayout struct {
	name    string
	kind    addrKind
	at      int // offset of kallsyms_offsets or kallsyms_addresses
	relBase int // offset of kallsyms_relative_base (addrBaseRelative)
}

// addresses decodes the symbol addresses for one layout and reports
// whether they look like a real table: sorted, and (when absolute)
// mostly kernel addresses. PC-relative addresses come back relative to
// the address of kallsyms_offsets[0].
func (l addrLayout) addresses(buf []byte, n int) ([]uint64, bool) {
	if l.at < 0 || l.at%4 != 0 {
		return nil, false
	}
	addrs := make([]uint64, n)
	switch l.kind {
	case addrAbsolute:
		if l.at%8 != 0 || l.at+8*n > len(buf) {
			return nil, false
		}
		for i := range addrs {
			addrs[i] = binary.LittleEndian.Uint64(buf[l.at+8*i:])
		}
	case addrBaseRelative:
		if l.at+4*n > len(buf) || l.relBase < l.at+4*n || l.relBase+8 > len(buf) {
			return nil, false
		}
		base := binary.LittleEndian.Uint64(buf[l.relBase:])
		if base < 0xffff800000000000 {
			return nil, false
		}
		// With CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP before 6.15)
		// non-negative offsets are absolute per-CPU addresses and the
		// rest are base-1-offset; otherwise all are unsigned offsets
		// from the base. The image is far smaller than 2 GiB, so a
		// negative offset only exists in the first scheme.
		absPercpu := false
		for i := 0; i < n; i++ {
			if int32(binary.LittleEndian.Uint32(buf[l.at+4*i:])) < 0 {
				absPercpu = true
				break
			}
		}
		for i := range addrs {
			off := int32(binary.LittleEndian.Uint32(buf[l.at+4*i:]))
			switch {
			case !absPercpu:
				addrs[i] = base + uint64(uint32(off))
			case off >= 0:
				addrs[i] = uint64(off)
			default:
				addrs[i] = base - 1 - uint64(int64(off))
			}
		}
	case addrPCRelative:
		if l.at+4*n > len(buf) {
			return nil, false
		}
		for i := range addrs {
			off := int32(binary.LittleEndian.Uint32(buf[l.at+4*i:]))
			addrs[i] = uint64(int64(4*i) + int64(off))
		}
	}
	kernel := 0
	for i, a := range addrs {
		// Relative addresses are signed.
		if i > 0 && (l.kind != addrPCRelative && a < addrs[i-1] || l.kind == addrPCRelative && int64(a) < int64(addrs[i-1])) {
			return nil, false
		}
		if a >= 0xffff800000000000 {
			kernel++
		}
	}
	if l.kind == addrPCRelative {
		// Relative: only the order can be checked here, and that the
		// table spans less than the 1 GiB kernel image area.
		return addrs, int64(addrs[n-1])-int64(addrs[0]) < 1<<30
	}
	return addrs, kernel >= n*9/10
}

// parseKallsyms reads the kallsyms tables out of buf, a copy of the part
// of the kernel image that holds them, given a hit of tokenDigits. For a
// PC-relative table (7.x) the addresses are relative to the returned
// table offset; callers relocate them once they know its virtual address.
func parseKallsyms(buf []byte, hit int) (*Kallsyms, error) {
	tt, err := findTokenTable(buf, hit)
	if err != nil {
		return nil, err
	}
	nm, err := findNames(buf, tt)
	if err != nil {
		return nil, err
	}
	n, a := nm.n, nm.align
	after := alignUp(tt.index+512, a)
	layouts := []addrLayout{
		// 6.4 to 6.x: offsets and relative base after the token index.
		{name: "6.4+ base-relative", kind: addrBaseRelative, at: after, relBase: alignUp(after+4*n, a)},
		// 7.x: PC-relative offsets after the token index.
		{name: "7.x pc-relative", kind: addrPCRelative, at: after},
		// 4.6-6.3: offsets, relative base, then num_syms.
		{name: "base-relative", kind: addrBaseRelative, at: nm.numSymsAt - a - alignUp(4*n, a), relBase: nm.numSymsAt - a},
		// Absolute addresses (before 4.6, or !KALLSYMS_BASE_RELATIVE).
		{name: "absolute", kind: addrAbsolute, at: nm.numSymsAt - 8*n},
		{name: "6.4+ absolute", kind: addrAbsolute, at: after},
	}
	var addrs []uint64
	var layout addrLayout
	for _, l := range layouts {
		if v, ok := l.addresses(buf, n); ok {
			addrs, layout = v, l
			break
		}
	}
	if addrs == nil {
		return nil, fmt.Errorf("kallsyms: %d names found, but no address table matches them", n)
	}
	ks := &Kallsyms{
		names:  bytes.Clone(buf[nm.start:nm.end]),
		entry:  make([]uint32, n),
		addrs:  addrs,
		layout: layout.name,
	}
	for i := range tt.tokens {
		ks.tokens[i] = bytes.Clone(tt.tokens[i])
	}
	p := 0
	for i := range ks.entry {
		ks.entry[i] = uint32(p)
		d, l, ok := nameEntry(ks.names, p)
		if !ok {
			return nil, fmt.Errorf("kallsyms: name %d at %#x: bad length", i, nm.start+p)
		}
		p = d + l
	}
	if layout.kind == addrPCRelative {
		ks.relative = true
		ks.tableOff = layout.at
	}
	ks.seqs = findSeqs(buf, ks, nm, tt, layout)
	return ks, nil
}

// findSeqs returns kallsyms_seqs_of_names (6.2+) when it is where the
// layout puts it and really orders the names; nil otherwise.
func findSeqs(buf []byte, ks *Kallsyms, nm *names, tt *tokenTable, layout addrLayout) []uint32 {
	n, a := nm.n, nm.align
	var at []int
	switch {
	case layout.kind == addrPCRelative:
		at = []int{alignUp(layout.at+4*n, a)}
	case layout.at > tt.index:
		at = []int{alignUp(layout.relBase+8, a)}
	default: // 6.2-6.3: between the markers and the token table
		at = []int{alignUp(nm.markers+nm.markersSz*((n+255)/256), a)}
	}
	for _, off := range at {
		// 3 big-endian bytes per entry since 6.3, a u32 in 6.2.
		for _, size := range []int{3, 4} {
			if off < 0 || off+size*n > len(buf) {
				continue
			}
			seqs := make([]uint32, n)
			ok := true
			for i := range seqs {
				b := buf[off+size*i:]
				var v uint32
				if size == 3 {
					v = uint32(b[0])<<16 | uint32(b[1])<<8 | uint32(b[2])
				} else {
					v = binary.LittleEndian.Uint32(b)
				}
				if v >= uint32(n) {
					ok = false
					break
				}
				seqs[i] = v
			}
			if ok && sortedNames(ks, seqs) {
				return seqs
			}
		}
	}
	return nil
}

// sortedNames checks that seqs orders the names as strcmp does (a kernel
// built with clang LTO sorts without ".llvm.*" suffixes and fails this;
// the map is used then). Expanding every name twice would cost more than
// the rest of discovery, so up to 8192 evenly spread neighbours are
// compared; lookups stay bounded whatever the table holds.
func sortedNames(ks *Kallsyms, seqs []uint32) bool {
	var a, b [ksymNameLen]byte
	step := max(1, len(seqs)/8192)
	for i := 0; i+1 < len(seqs); i += step {
		x := ks.expand(int(seqs[i]), a[:0])
		y := ks.expand(int(seqs[i+1]), b[:0])
		if len(x) == 0 || len(y) == 0 || bytes.Compare(x[1:], y[1:]) > 0 {
			return false
		}
	}
	return true
}

// relocate adds base to every address of a PC-relative table, once the
// virtual address of kallsyms_offsets (base) is known.
func (s *Kallsyms) relocate(base uint64) {
	for i := range s.addrs {
		s.addrs[i] += base
	}
	s.relative = false
}

func readUint(b []byte, size int) uint64 {
	if size == 8 {
		return binary.LittleEndian.Uint64(b)
	}
	return uint64(binary.LittleEndian.Uint32(b))
}

func alignUp(v, a int) int   { return (v + a - 1) / a * a }
func alignDown(v, a int) int { return v / a * a }
