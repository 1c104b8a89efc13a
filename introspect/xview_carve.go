package introspect

import (
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
)

// list_del's poison values on x86-64 (include/linux/poison.h, with
// CONFIG_ILLEGAL_POINTER_VALUE 0xdead000000000000).
const (
	listPoison1 = 0xdead000000000100
	listPoison2 = 0xdead000000000122
)

// mappedRange is one leaf mapping of the kernel page tables.
type mappedRange struct{ va, pa, size uint64 }

// mappedPages walks the kernel's page tables over [lo, hi) and returns its
// present leaf mappings in address order, at most maxPages 4 KiB pages'
// worth (truncated then says so). Only the tables over the range are
// read.
func (k *Kernel) mappedPages(lo, hi uint64, maxPages int) (out []mappedRange, truncated bool, err error) {
	root := k.PGD
	if root == 0 && k.AS != nil {
		root = k.AS.Root()
	}
	if root == 0 {
		return nil, false, fmt.Errorf("kernel page-table root unknown")
	}
	levels := k.Levels
	if levels != 4 && levels != 5 {
		return nil, false, fmt.Errorf("%d paging levels", levels)
	}
	topBits := uint(12 + 9*levels)
	pages, tables := 0, 0
	tbl := make([][]byte, levels+1)
	for i := range tbl {
		tbl[i] = make([]byte, 4096)
	}
	var walk func(table uint64, level int, base uint64) error
	walk = func(table uint64, level int, base uint64) error {
		if tables++; tables > maxPages/64+64 {
			truncated = true
			return nil
		}
		b := tbl[level]
		if _, err := k.Mem.ReadAt(b, int64(table)); err != nil {
			return fmt.Errorf("page table at %#x: %w", table, err)
		}
		shift := uint(12 + 9*(level-1))
		for i := 0; i < 512 && !truncated; i++ {
			va := base + uint64(i)<<shift
			if level == levels && va>>(topBits-1)&1 == 1 {
				va |= ^uint64(0) << topBits // sign-extend the top level
			}
			end := va + (uint64(1)<<shift - 1)
			if end < lo || va >= hi {
				continue
			}
			e := le64(b, 8*i)
			if e&guestmem.PTEPresent == 0 {
				continue
			}
			if level == 1 || level <= 3 && e&guestmem.PTEPS != 0 {
				size := uint64(1) << shift
				out = append(out, mappedRange{va: va, pa: e & guestmem.PTEAddrMask &^ (size - 1), size: size})
				if pages += int(size >> 12); pages >= maxPages {
					truncated = true
				}
				continue
			}
			if err := walk(e&guestmem.PTEAddrMask, level-1, va); err != nil {
				return err
			}
		}
		return nil
	}
	err = walk(root, levels, 0)
	return out, truncated, err
}

// moduleCheck is what validModule needs to know of struct module.
type moduleCheck struct {
	name, list  int64
	state       int64 // -1 when unknown
	region      int64 // the (base, size) pair whose region holds the struct
	self        int64 // mkobj.mod; -1 when unknown
	span        int   // bytes of the struct the checks read
	lo, hi      uint64
	kernelPtrOK func(uint64) bool
}

func newModuleCheck(k *Kernel, off *Offsets, v *viewOffsets, lo, hi uint64) (*moduleCheck, error) {
	if !off.ModuleName.Known() || !off.ModuleList.Known() || !off.ModuleBase.Known() || !off.ModuleSize.Known() {
		return nil, fmt.Errorf("struct module's name, list, base and size offsets: %w (without BTF they are solved from loaded modules)", ErrOffsetsMissing)
	}
	c := &moduleCheck{name: off.ModuleName.Value, list: off.ModuleList.Value, state: -1, self: -1, lo: lo, hi: hi, kernelPtrOK: k.kernelPtr}
	if off.ModuleState.Known() {
		c.state = off.ModuleState.Value
	}
	// Before 6.4 core_layout holds the whole core, struct module
	// included; since, mem[MOD_DATA] (the second region) does.
	c.region = off.ModuleBase.Value
	if off.ModuleMemStride.Known() {
		c.region += off.ModuleMemStride.Value
	}
	if v.moduleMkobj.Known() {
		c.self = v.moduleMkobj.Value
	}
	c.span = int(max(c.name+moduleNameLen, c.list+16, c.state+4, c.region+12, c.self+8))
	if c.span > 0x2000 || c.name < 0 || c.list < 0 || c.region < 0 {
		return nil, fmt.Errorf("struct module offsets out of range")
	}
	return c, nil
}

// validModule reports whether b, the bytes at self, are a struct module,
// and its name.
func (c *moduleCheck) validModule(b []byte, self uint64) (string, bool) {
	if len(b) < c.span || self < c.lo || self >= c.hi {
		return "", false
	}
	if c.state >= 0 && le32(b, int(c.state)) > 3 {
		return "", false
	}
	next, prev := le64(b, int(c.list)), le64(b, int(c.list)+8)
	if !(c.kernelPtrOK(next) && c.kernelPtrOK(prev) || next == listPoison1 && prev == listPoison2) {
		return "", false
	}
	name, ok := moduleName(b[c.name:])
	if !ok {
		return "", false
	}
	base, size, ok := modulePair(b, int(c.region))
	if !ok || self < base || self >= base+uint64(size) {
		return "", false
	}
	if c.self >= 0 && le64(b, int(c.self)) != self {
		return "", false
	}
	return name, true
}

// carveModules looks for struct modules at every 8-byte boundary of the
// pages given, reading each page and what follows it (a struct may cross
// into the next page), and returns those that validate.
func (k *Kernel) carveModules(off *Offsets, c *moduleCheck, pages []uint64) []Module {
	var out []Module
	seen := map[uint64]bool{}
	for _, va := range pages {
		buf, err := readUpTo(k, va, 0x1000+c.span)
		if err != nil {
			continue
		}
		for p := 0; p+c.span <= len(buf) && p < 0x1000; p += 8 {
			// The cheapest test first: a name character where the
			// name starts.
			if !moduleNameChar(buf[p+int(c.name)]) {
				continue
			}
			self := va + uint64(p)
			if _, ok := c.validModule(buf[p:], self); !ok || seen[self] {
				continue
			}
			seen[self] = true
			m, err := readModule(k, off, self)
			if err != nil {
				continue
			}
			out = append(out, m)
			if len(out) >= maxCarved {
				return out
			}
		}
	}
	return out
}

// moduleCarve runs the module_carve view.
func (k *Kernel) moduleCarve(off *Offsets, v *viewOffsets) (ViewResult, []Module) {
	vr := ViewResult{Name: ViewModuleCarve}
	lo := uint64(modulesStart)
	if end := (k.TextVA + k.imageSize + 0x1fffff) &^ 0x1fffff; k.TextVA != 0 && end > lo && end < modulesEnd {
		lo = end // a KASLR'd image may lie in the low module range
	}
	c, err := newModuleCheck(k, off, v, lo, modulesEnd)
	if err != nil {
		vr.Reason = err.Error()
		return vr, nil
	}
	ranges, truncated, err := k.mappedPages(lo, modulesEnd, maxCarvePages)
	if err != nil {
		vr.Reason = "module area: " + err.Error()
		return vr, nil
	}
	var pages []uint64
	for _, r := range ranges {
		for a := r.va; a < r.va+r.size && len(pages) < maxCarvePages; a += 0x1000 {
			pages = append(pages, a)
		}
	}
	ms := k.carveModules(off, c, pages)
	vr.Ran, vr.Count = true, len(ms)
	if truncated {
		vr.Reason = fmt.Sprintf("stopped after %d pages of the module area (bound)", len(pages))
	}
	if len(ms) >= maxCarved {
		vr.Reason = fmt.Sprintf("stopped after %d candidates (bound)", len(ms))
	}
	return vr, ms
}
