package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
)

// Finding the kernel image in guest physical memory, with no registers:
// the kallsyms token table is found by its structure, and the kernel's own
// page table for its image, level2_kernel_pgt (arch/x86/kernel/head_64.S),
// ties the image's physical address to its virtual one.

const (
	pmdSize = 2 << 20
	// physicalStart is CONFIG_PHYSICAL_START, where the kernel is loaded
	// when KASLR does not move it.
	physicalStart = 16 << 20
	// scanChunk is how much guest memory one scan step reads (into one
	// reused buffer).
	scanChunk = 1 << 20
	// kallsymsBack and kallsymsFwd bound the part of the image read
	// around the token table: the names, markers and (before 6.4) the
	// offsets lie before it, the offsets and seqs_of_names (6.4+) after.
	// The tables are read first with the smaller bounds, which fit a
	// distribution kernel's (Debian 6.1: 87k symbols, about 2 MiB of
	// tables), and only when those do not parse with the larger ones.
	kallsymsBackSmall = 6 << 20
	kallsymsFwdSmall  = 2 << 20
	kallsymsBack      = 24 << 20
	kallsymsFwd       = 8 << 20
	// imageWindow bounds how far from the kallsyms tables the kernel's
	// page tables (in .data, after .rodata) are searched.
	imageWindow = 96 << 20
)

// span is a range of guest physical addresses inside one RAM region.
type span struct{ start, end uint64 }

// scanOrder returns guest RAM as spans, starting at hint: the physical
// address of kernel code a vCPU was running when known, else the default
// load address (16 MiB), where the kernel is without KASLR (KASLR only
// moves it up). The kallsyms tables are in .rodata, after the code.
func scanOrder(regions []guestmem.Region, hint uint64) []span {
	if hint == 0 {
		hint = physicalStart
	}
	var first, rest []span
	for _, r := range regions {
		if r.ReadOnly || r.Size == 0 {
			continue // ROMs and flash hold no kernel
		}
		s, e := r.GPA, r.End()
		if hint > s && hint < e {
			rest = append(rest, span{s, hint})
			s = hint
		}
		if s >= hint {
			first = append(first, span{s, e})
		} else {
			rest = append(rest, span{s, e})
		}
	}
	return append(first, rest...)
}

// regionOf returns the RAM region holding gpa.
func regionOf(regions []guestmem.Region, gpa uint64) (span, bool) {
	for _, r := range regions {
		if gpa >= r.GPA && gpa < r.End() {
			return span{r.GPA, r.End()}, true
		}
	}
	return span{}, false
}

// readSpan reads [start, end) clipped to the RAM region holding around.
func readSpan(mem guestmem.Memory, regions []guestmem.Region, around, start, end uint64) ([]byte, uint64, error) {
	r, ok := regionOf(regions, around)
	if !ok {
		return nil, 0, fmt.Errorf("%#x is not in guest RAM", around)
	}
	if start > around || start < r.start {
		start = r.start
	}
	if end < around || end > r.end {
		end = r.end
	}
	// Page-aligned, so offsets keep the alignment of guest addresses.
	if a := start &^ (guestmem.PageSize - 1); a >= r.start {
		start = a
	}
	buf := make([]byte, end-start)
	if _, err := mem.ReadAt(buf, int64(start)); err != nil {
		return nil, 0, fmt.Errorf("read guest physical %#x-%#x: %w", start, end, err)
	}
	return buf, start, nil
}

// kallsymsHit is a parsed symbol table and where its bytes are.
type kallsymsHit struct {
	syms *Kallsyms
	// gpa of the token-table hit, and of offset 0 of the parsed buffer.
	hit, bufGPA uint64
}

// maxCandidates bounds the token-table candidates tried: each costs a
// small read, and a guest could plant decoys.
const maxCandidates = 1024

// findKallsyms scans guest RAM for the kallsyms tables and hands each
// table it can parse to accept, until accept takes one (returns nil).
// Another kernel's image can be in guest memory too (a vmlinux in the
// page cache); accept rejects a table that is not the running kernel's.
//
// Without a hint, the scan first samples one page every sampleStride for
// something that looks like the tables' address array and searches
// densely around those pages; then, if that found nothing, all of RAM
// from hint on.
func findKallsyms(mem guestmem.Memory, regions []guestmem.Region, hint uint64, logf func(string, ...any), accept func(*kallsymsHit) error) (*kallsymsHit, error) {
	var errs []error
	tried := map[uint64]bool{}
	var found *kallsymsHit
	try := func(hit uint64) (stop bool, err error) {
		if tried[hit] {
			return false, nil
		}
		tried[hit] = true
		if len(tried) > maxCandidates {
			return true, fmt.Errorf("kallsyms: more than %d false candidates", maxCandidates)
		}
		h, err := tryKallsyms(mem, regions, hit)
		if err == nil {
			if err = accept(h); err != nil {
				logf("kallsyms at guest physical %#x is not the running kernel's: %v", hit, err)
			}
		}
		if err != nil {
			if len(errs) < 8 { // enough to tell what went wrong
				errs = append(errs, fmt.Errorf("candidate at %#x: %w", hit, err))
			}
			return false, nil
		}
		logf("kallsyms: %d symbols (%s) at guest physical %#x", h.syms.Len(), h.syms.Layout(), hit)
		found = h
		return true, nil
	}
	var spans []span
	// With a vCPU's hint the tables are a few MiB after it: no sampling.
	for _, c := range sampleKallsyms(mem, regions, hint == 0) {
		if r, ok := regionOf(regions, c); ok {
			// The token table follows the address array by the names
			// (before 6.4) or precedes it by little (6.4+).
			spans = append(spans, span{max(sat(c, 4<<20), r.start), min(c+16<<20, r.end)})
		}
	}
	spans = append(spans, scanOrder(regions, hint)...)
	if err := scanSpans(mem, spans, try); err != nil {
		return nil, err
	}
	if found != nil {
		return found, nil
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("kallsyms token table: %w (is CONFIG_KALLSYMS off?)", ErrNotFound)
	}
	return nil, fmt.Errorf("kallsyms: %w (%d candidates): %w", ErrNotFound, len(tried), errors.Join(errs...))
}

// scanSpans calls try for every token-table hit in spans, in order,
// until try says stop.
func scanSpans(mem guestmem.Memory, spans []span, try func(hit uint64) (stop bool, err error)) error {
	buf := make([]byte, scanChunk+len(tokenDigits))
	for _, sp := range spans {
		for pos := sp.start; pos < sp.end; pos += scanChunk {
			n := min(uint64(len(buf)), sp.end-pos)
			chunk := buf[:n]
			if _, err := mem.ReadAt(chunk, int64(pos)); err != nil {
				return fmt.Errorf("scan guest physical %#x: %w", pos, err)
			}
			for off := 0; ; {
				i := bytes.Index(chunk[off:], tokenDigits)
				if i < 0 {
					break
				}
				p := off + i
				off = p + 1
				if p >= scanChunk {
					break // the next chunk starts there
				}
				// The digits follow the NUL that ends token 0x2f.
				if p == 0 || chunk[p-1] != 0 {
					continue
				}
				if stop, err := try(pos + uint64(p)); stop || err != nil {
					return err
				}
			}
		}
	}
	return nil
}

const (
	// sampleStride is the distance between sampled pages: the address
	// array of a kernel with 30k symbols is 120 KiB.
	sampleStride = 64 << 10
	// maxSampleHits bounds the windows searched densely after sampling.
	maxSampleHits = 4
)

// sampleKallsyms returns pages of guest RAM that look like
// kallsyms_offsets (sorted 32-bit offsets: small steps, one direction)
// or kallsyms_addresses (sorted kernel pointers), at most one per 16 MiB.
func sampleKallsyms(mem guestmem.Memory, regions []guestmem.Region, enabled bool) []uint64 {
	var hits []uint64
	if !enabled {
		return nil
	}
	page := make([]byte, guestmem.PageSize)
	for _, sp := range scanOrder(regions, 0) {
		for a := (sp.start + sampleStride - 1) &^ (sampleStride - 1); a+guestmem.PageSize <= sp.end; a += sampleStride {
			if len(hits) > 0 && a < hits[len(hits)-1]+16<<20 {
				continue
			}
			if _, err := mem.ReadAt(page, int64(a)); err != nil {
				continue
			}
			if looksLikeAddresses(page) {
				hits = append(hits, a)
				if len(hits) == maxSampleHits {
					return hits
				}
			}
		}
	}
	return hits
}

// looksLikeAddresses reports whether page holds part of a sorted symbol
// address array in one of the kallsyms layouts.
func looksLikeAddresses(page []byte) bool {
	// 32-bit offsets: base-relative ones grow, absolute-per-CPU ones
	// (relative_base-1-addr) shrink, PC-relative ones grow by the gap
	// between symbols less 4.
	up, down, distinct := 0, 0, 0
	prev := int32(binary.LittleEndian.Uint32(page))
	for i := 4; i < len(page); i += 4 {
		v := int32(binary.LittleEndian.Uint32(page[i:]))
		d := int64(v) - int64(prev)
		if d >= -4 && d < 1<<16 {
			up++
		}
		if d <= 0 && d > -1<<16 {
			down++
		}
		if d != 0 {
			distinct++
		}
		prev = v
	}
	n := len(page)/4 - 1
	if distinct > n/2 && (up >= n-8 || down >= n-8) {
		return true
	}
	// 64-bit absolute addresses.
	sorted, kernel, distinct := 0, 0, 0
	p64 := binary.LittleEndian.Uint64(page)
	for i := 8; i < len(page); i += 8 {
		v := binary.LittleEndian.Uint64(page[i:])
		if v >= p64 && v-p64 < 1<<16 {
			sorted++
		}
		if v >= startKernelMap {
			kernel++
		}
		if v != p64 {
			distinct++
		}
		p64 = v
	}
	n = len(page)/8 - 1
	return distinct > n/2 && sorted >= n-4 && kernel >= n-4
}

// tryKallsyms checks one token-table candidate cheaply, then reads the
// image around it and parses the tables.
func tryKallsyms(mem guestmem.Memory, regions []guestmem.Region, hit uint64) (*kallsymsHit, error) {
	small, base, err := readSpan(mem, regions, hit, sat(hit, 16<<10), hit+64<<10)
	if err != nil {
		return nil, err
	}
	if _, err := findTokenTable(small, int(hit-base)); err != nil {
		return nil, err
	}
	var errs []error
	for _, w := range [][2]uint64{{kallsymsBackSmall, kallsymsFwdSmall}, {kallsymsBack, kallsymsFwd}} {
		win, base, err := readSpan(mem, regions, hit, sat(hit, w[0]), hit+w[1])
		if err != nil {
			return nil, err
		}
		ks, err := parseKallsyms(win, int(hit-base))
		if err == nil {
			return &kallsymsHit{syms: ks, hit: hit, bufGPA: base}, nil
		}
		errs = append(errs, fmt.Errorf("%d MiB around the token table: %w", len(win)>>20, err))
	}
	return nil, errors.Join(errs...)
}

// sat returns a-b, or 0 when b > a.
func sat(a, b uint64) uint64 {
	if b > a {
		return 0
	}
	return a - b
}

// level2Run reports whether t looks like level2_kernel_pgt after boot:
// entry 0 (0xffffffff80000000, below any kernel) empty, and from the
// first used entry i0 on, 2 MiB pages mapping physically contiguous
// memory (cleanup_highmap cleared the entries outside _text.._end).
func level2Run(t []byte) (i0, last int, pa0 uint64, ok bool) {
	if binary.LittleEndian.Uint64(t) != 0 {
		return 0, 0, 0, false
	}
	i0 = -1
	count := 0
	for i := 1; i < 512; i++ {
		e := binary.LittleEndian.Uint64(t[8*i:])
		if e == 0 {
			continue
		}
		if i0 < 0 {
			if e&(guestmem.PTEPresent|guestmem.PTEPS) != guestmem.PTEPresent|guestmem.PTEPS {
				return 0, 0, 0, false
			}
			i0, pa0 = i, e&guestmem.PTEAddrMask
			if pa0%pmdSize != 0 {
				return 0, 0, 0, false
			}
		}
		// Entries split into 4 KiB tables (set_memory_*) or made
		// non-present (freed init memory) are skipped; every 2 MiB
		// page must be where a linear mapping puts it.
		if e&(guestmem.PTEPresent|guestmem.PTEPS) == guestmem.PTEPresent|guestmem.PTEPS {
			if e&guestmem.PTEAddrMask != pa0+uint64(i-i0)*pmdSize {
				return 0, 0, 0, false
			}
			count++
		}
		last = i
	}
	return i0, last, pa0, count >= 2
}

// level2 is level2_kernel_pgt: where it is, its first and last used
// entries, and the physical address the first maps.
type level2 struct {
	gpa         uint64
	first, last int
	pa          uint64
}

// findLevel2 finds level2_kernel_pgt, the table that maps the image
// holding the kallsyms tables at around; match picks the right one. With
// vCPU registers it is where their page tables map the image; else the
// pages around the tables are searched.
func findLevel2(mem guestmem.Memory, regions []guestmem.Region, cpus []guestmem.CPU, around uint64, match func(i0 int, pa0 uint64) bool) (level2, error) {
	r, ok := regionOf(regions, around)
	if !ok {
		return level2{}, fmt.Errorf("%#x is not in guest RAM", around)
	}
	page := make([]byte, guestmem.PageSize)
	for _, gpa := range level2FromCPUs(mem, cpus) {
		if _, err := mem.ReadAt(page, int64(gpa)); err != nil {
			continue
		}
		// A PTI user page table has its own copy, mapping only the
		// entry text: the table must map the kallsyms tables too.
		i, last, pa, ok := level2Run(page)
		if ok && match(i, pa) && around >= pa && around-pa < uint64(last-i+1)*pmdSize {
			return level2{gpa: gpa, first: i, last: last, pa: pa}, nil
		}
	}
	// .data (where head_64.S puts the table) follows .rodata a few MiB
	// on, so read forward from the tables in steps, then backward.
	const step = 2 << 20
	buf := make([]byte, step)
	from := around &^ (guestmem.PageSize - 1)
	var starts []uint64
	for a := from; a < from+imageWindow && a < r.end; a += step {
		starts = append(starts, a)
	}
	for a := from; a > r.start && a+imageWindow > from; {
		a = max(sat(a, step), r.start)
		starts = append(starts, a)
	}
	for _, a := range starts {
		b := buf[:min(step, r.end-a)]
		if _, err := mem.ReadAt(b, int64(a)); err != nil {
			return level2{}, fmt.Errorf("read guest physical %#x: %w", a, err)
		}
		for off := 0; off+guestmem.PageSize <= len(b); off += guestmem.PageSize {
			i, last, pa, ok := level2Run(b[off : off+guestmem.PageSize])
			if ok && match(i, pa) {
				return level2{gpa: a + uint64(off), first: i, last: last, pa: pa}, nil
			}
		}
	}
	return level2{}, fmt.Errorf("level2_kernel_pgt: %w", ErrNotFound)
}

// level2FromCPUs returns the page tables that map __START_KERNEL_map
// (PGD entry 511, PUD entry 510) under the vCPUs' CR3s: every Linux page
// table shares level2_kernel_pgt. With PTI, a vCPU in user mode has the
// user half of its PGD pair in CR3; the kernel half is tried first then.
func level2FromCPUs(mem guestmem.Memory, cpus []guestmem.CPU) []uint64 {
	var out []uint64
	entry := func(table uint64, i int) uint64 {
		var b [8]byte
		if _, err := mem.ReadAt(b[:], int64(table+uint64(i)*8)); err != nil {
			return 0
		}
		e := binary.LittleEndian.Uint64(b[:])
		if e&guestmem.PTEPresent == 0 || e&guestmem.PTEPS != 0 {
			return 0
		}
		return e & guestmem.PTEAddrMask
	}
	for _, c := range cpus {
		lv := c.Paging()
		if lv < 4 {
			continue
		}
		roots := []uint64{guestmem.KernelCR3(c.CR3), c.CR3 & guestmem.PTEAddrMask}
		if c.RIP >= startKernelMap {
			roots[0], roots[1] = roots[1], roots[0] // kernel mode: CR3 is the kernel's
		}
		for _, t := range roots {
			for l := lv; l > 3 && t != 0; l-- {
				t = entry(t, 511)
			}
			if t != 0 {
				t = entry(t, 510)
			}
			if t != 0 && len(out) < 16 {
				out = append(out, t)
			}
		}
	}
	return out
}

// findPGD searches the image for the kernel's top-level page table: the
// page whose last entry leads to level3_kernel_pgt, whose entry 510 is
// level2_kernel_pgt. It returns the table and the paging levels.
func findPGD(mem guestmem.Memory, regions []guestmem.Region, around, level2 uint64) (uint64, int, error) {
	// head_64.S keeps init_top_pgt a few pages before level2_kernel_pgt:
	// look there first, then around the kallsyms tables.
	pgd, levels, near, err := findPGDIn(mem, regions, level2, sat(level2, 1<<20), level2+1<<20, level2)
	if err == nil && near {
		return pgd, levels, nil
	}
	pgd, levels, _, err = findPGDIn(mem, regions, around, sat(around, imageWindow), around+imageWindow, level2)
	return pgd, levels, err
}

// findPGDIn is findPGD over the pages of [start, end); near reports that
// the table found sits next to its child table.
func findPGDIn(mem guestmem.Memory, regions []guestmem.Region, around, start, end, level2 uint64) (pgd uint64, lv int, near bool, err error) {
	r, ok := regionOf(regions, around)
	if !ok {
		return 0, 0, false, fmt.Errorf("%#x is not in guest RAM", around)
	}
	start, end = max(start&^(guestmem.PageSize-1), r.start), min(end, r.end)
	// The window can be large: stream it in chunks, one pass per level.
	buf := make([]byte, 2<<20)
	var readErr error
	pages := func(yield func(gpa uint64, page []byte) bool) {
		for a := start; a < end; a += uint64(len(buf)) {
			b := buf[:min(uint64(len(buf)), end-a)]
			if _, err := mem.ReadAt(b, int64(a)); err != nil {
				readErr = fmt.Errorf("read guest physical %#x: %w", a, err)
				return
			}
			for off := 0; off+guestmem.PageSize <= len(b); off += guestmem.PageSize {
				if !yield(a+uint64(off), b[off:off+guestmem.PageSize]) {
					return
				}
			}
		}
	}
	next := func(page []byte, idx int) uint64 {
		e := binary.LittleEndian.Uint64(page[8*idx:])
		if e&guestmem.PTEPresent == 0 || e&guestmem.PTEPS != 0 {
			return 0
		}
		return e & guestmem.PTEAddrMask
	}
	level3 := map[uint64]bool{}
	for gpa, p := range pages {
		if level2 != 0 && next(p, 510) == level2 {
			level3[gpa] = true
		}
	}
	// Every process's PGD (live, or freed with its kernel half intact)
	// points at level3_kernel_pgt too. init_top_pgt is the one in the
	// image, in the same head_64.S block as the tables below it: take
	// the candidate closest before its child table, with no user
	// mappings (early_top_pgt, also there, keeps only its last entry).
	type cand struct {
		top, child uint64
		levels     int
		page       []byte
	}
	const maxCands = 4096
	var cands []cand
	tops := map[uint64]bool{}
	for gpa, p := range pages {
		if c := next(p, 511); c != 0 && level3[c] && len(cands) < maxCands {
			cands = append(cands, cand{gpa, c, 4, bytes.Clone(p)})
			tops[gpa] = true
		}
	}
	// With 5-level paging those are level4_kernel_pgt (a P4D) and the
	// PGDs point at them in turn.
	for gpa, p := range pages {
		if c := next(p, 511); c != 0 && tops[c] && len(cands) < 2*maxCands {
			cands = append(cands, cand{gpa, c, 5, bytes.Clone(p)})
		}
	}
	if readErr != nil {
		return 0, 0, false, readErr
	}
	best, bestUsed, levels := uint64(0), -1<<30, 4
	for _, c := range cands {
		used := 0
		for i := 0; i < 512; i++ {
			present := binary.LittleEndian.Uint64(c.page[8*i:])&guestmem.PTEPresent != 0
			switch {
			case present && i < 256:
				used = -1 << 20
			case present:
				used++
			}
		}
		if c.top < c.child && c.child-c.top <= 64<<10 {
			used += 1 << 10 // next to its child table
		}
		if used > bestUsed {
			best, bestUsed, levels = c.top, used, c.levels
		}
	}
	if bestUsed == -1<<30 {
		return 0, 0, false, fmt.Errorf("kernel page-table root (init_top_pgt): %w", ErrNotFound)
	}
	return best, levels, bestUsed >= 1<<10, nil
}

// codeHint returns the physical 2 MiB page of the kernel code a vCPU is
// running or, when every vCPU runs user code, of the start of the image
// its page tables map at __START_KERNEL_map; 0 without usable registers.
// With a hint the kernel is found without a sweep of guest RAM.
func codeHint(mem guestmem.Memory, cpus []guestmem.CPU) uint64 {
	for _, c := range cpus {
		if c.Paging() < 4 || c.RIP < startKernelMap {
			continue
		}
		as, err := guestmem.KernelAddressSpace(mem, c.CR3, c.Paging(), c.RIP)
		if err != nil {
			continue
		}
		if pa, err := as.Translate(c.RIP); err == nil {
			return pa &^ (pmdSize - 1)
		}
	}
	page := make([]byte, guestmem.PageSize)
	for _, gpa := range level2FromCPUs(mem, cpus) {
		if _, err := mem.ReadAt(page, int64(gpa)); err != nil {
			continue
		}
		if _, _, pa, ok := level2Run(page); ok {
			return pa
		}
	}
	return 0
}
