package introspect

import (
	"fmt"
)

// Module area of x86-64 (Documentation/arch/x86/x86_64/mm.rst): MODULES_VADDR
// is 0xffffffffa0000000, or 0xffffffffc0000000 with a 1 GiB kernel image
// (KASLR); MODULES_END 0xffffffffff000000.
const (
	modulesStart = 0xffffffffa0000000
	modulesEnd   = 0xffffffffff000000
	// moduleNameLen is MODULE_NAME_LEN on 64-bit: 64 - sizeof(long).
	moduleNameLen = 56
	// maxModules bounds the module list walk.
	maxModules = 1 << 14
	// moduleWindow bounds how much of struct module the solver reads
	// (6.1: 896 bytes; core_layout at 320).
	moduleWindow = 0x600
	// modMemTypes is MOD_MEM_NUM_TYPES (include/linux/module.h, 6.4+).
	modMemTypes = 7
)

func moduleNameChar(c byte) bool {
	return c == '_' || c == '-' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

// moduleName returns the module name at b[0:], which must be a
// NUL-terminated run of name characters zero-padded to moduleNameLen.
func moduleName(b []byte) (string, bool) {
	if len(b) < moduleNameLen {
		return "", false
	}
	n := 0
	for n < moduleNameLen && moduleNameChar(b[n]) {
		n++
	}
	if n == 0 || n == moduleNameLen || b[n] != 0 {
		return "", false
	}
	for _, c := range b[n:moduleNameLen] {
		if c != 0 {
			return "", false
		}
	}
	return string(b[:n]), true
}

// modulePair reads a (base, size) pair: a page-aligned pointer into the
// module area and a size that is a non-zero multiple of the page size
// below 1 GiB (module memory is allocated in whole pages, and
// CONFIG_STRICT_MODULE_RWX page-aligns each region).
func modulePair(b []byte, off int) (base uint64, size uint32, ok bool) {
	base, size = le64(b, off), le32(b, off+8)
	ok = off >= 0 && off+12 <= len(b) && base&0xfff == 0 && base >= modulesStart && base < modulesEnd &&
		size != 0 && size&0xfff == 0 && size < 1<<30
	return
}

// solveModules finds the struct module offsets from the modules list
// (kallsyms "modules"). With no module loaded nothing can be solved, and
// nothing is needed: the list is empty.
func (s *solver) solveModules(head uint64) error {
	nodes, err := s.list(head, maxModules)
	if err != nil {
		return fmt.Errorf("modules list: %w", err)
	}
	if len(nodes) == 0 {
		return &UnsolvedError{Members: map[string]string{
			"module.list": "no module loaded: nothing to solve from (and nothing to list)",
		}}
	}
	// Read each module from 0x40 before its list node: list sits near
	// the start of struct module in every version.
	const before = 0x40
	imgs := make([][]byte, len(nodes))
	for i, n := range nodes {
		b, err := s.read(n-before, moduleWindow)
		if err != nil {
			return fmt.Errorf("read module at %#x: %w", n, err)
		}
		imgs[i] = b
	}
	// name: relative to the list node, a zero-padded module name that
	// starts there (the byte before is not a name character) in every
	// module.
	var names []candidate
	for n := 16; n+moduleNameLen <= 0x100; n++ {
		if err := s.charge(len(imgs)); err != nil {
			return err
		}
		ok := true
		for _, b := range imgs {
			if _, valid := moduleName(b[before+n:]); !valid || moduleNameChar(b[before+n-1]) {
				ok = false
				break
			}
		}
		if ok {
			names = append(names, candidate{off: n})
		}
	}
	nameC, err := one("module.name", names)
	if err != nil {
		return err
	}
	// list: struct module_kobject mkobj holds a pointer back to its
	// module (mkobj.mod); the module starts that many bytes before the
	// list node, the same in every module.
	var lists []candidate
	for q := before + nameC.off + moduleNameLen; q+8 <= 0x200; q += 8 {
		if err := s.charge(len(imgs)); err != nil {
			return err
		}
		var l uint64
		ok := true
		for i, b := range imgs {
			v := le64(b, q)
			if v > nodes[i] || nodes[i]-v >= before {
				ok = false
				break
			}
			if i == 0 {
				l = nodes[i] - v
			} else if nodes[i]-v != l {
				ok = false
				break
			}
		}
		if ok {
			lists = append(lists, candidate{off: int(l)})
		}
	}
	listC, err := one("module.list", dedup(lists))
	if err != nil {
		return err
	}
	L := listC.off
	s.off.ModuleList = solved(L, "list_head on the circular list headed by kallsyms 'modules'; the module's own pointer back to itself (mkobj.mod) lies this far before it")
	s.off.ModuleName = solved(L+nameC.off, "zero-padded module name, starting right there, in every module")
	stateOK := true
	for _, b := range imgs {
		if le32(b, before-8) > 3 {
			stateOK = false
		}
	}
	if stateOK && L >= 8 {
		s.off.ModuleState = solved(L-8, "enum module_state (0..3) in every module, the u32 just before list (declaration order)")
	} else {
		s.miss.add("module.state", fmt.Errorf("the u32 before list is not a module state in every module"))
	}
	// base/size: the (base, size) pair whose region holds struct module
	// itself is the core (before 6.4) or data (6.4+) region.
	start := before - L // struct module in imgs
	var holds []candidate
	for f := start + L + nameC.off + moduleNameLen; f+12 <= len(imgs[0]); f += 8 {
		if err := s.charge(len(imgs)); err != nil {
			return err
		}
		ok := true
		for i, b := range imgs {
			base, size, valid := modulePair(b, f)
			self := nodes[i] - uint64(L)
			if !valid || self < base || self >= base+uint64(size) {
				ok = false
				break
			}
		}
		if ok {
			holds = append(holds, candidate{off: f - start})
		}
	}
	h, err := one("module.base", holds)
	if err != nil {
		return err
	}
	// 6.4+: mem[] is an array of struct module_memory, text first; the
	// region holding the module is mem[MOD_DATA] = mem[1]. A pair of the
	// same shape one stride before it, and again one after it (rodata),
	// is that array.
	for d := 16; d <= 0x80; d += 8 {
		if err := s.charge(len(imgs)); err != nil {
			return err
		}
		ok := true
		for _, b := range imgs {
			_, _, t := modulePair(b, start+h.off-d)
			_, _, r := modulePair(b, start+h.off+d)
			if !t || !r {
				ok = false
				break
			}
		}
		if ok {
			s.off.ModuleBase = solved(h.off-d, fmt.Sprintf("module.mem[] array: the region pair one stride (%d) before the one holding struct module (mem[MOD_DATA]), with mem[MOD_RODATA] one stride after", d))
			s.off.ModuleSize = solved(h.off-d+8, "size next to base")
			s.off.ModuleMemStride = solved(d, "distance between the mem[] region pairs")
			return nil
		}
	}
	s.off.ModuleBase = solved(h.off, "page-aligned pointer into the module area whose region (size next to it) holds struct module itself, in every module: core_layout")
	s.off.ModuleSize = solved(h.off+8, "non-zero page multiple next to base")
	return nil
}

func dedup(c []candidate) []candidate {
	seen := map[int]bool{}
	var out []candidate
	for _, x := range c {
		if !seen[x.off] {
			seen[x.off] = true
			out = append(out, x)
		}
	}
	return out
}
