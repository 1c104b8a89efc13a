package introspect

import (
	"errors"
	"fmt"
)

// The kernel patches its own text (jump labels, static calls, ftrace,
// kprobes) through text_poke, which maps the target page writable at a
// user-half address of a private mm, poking_mm (text_poke_mm since 6.16), and
// switches CR3 to it for the copy: no other kernel code writes with that
// CR3 loaded. The dispatch guard lets such stores through (they are the
// kernel's, and the integrity check still judges what they wrote).

// PokingPGD returns the guest-physical address of poking_mm's top page
// table, the CR3 text_poke runs with (PCID and flag bits aside).
func (k *Kernel) PokingPGD(off *Offsets) (uint64, error) {
	// Linux 6.16 renamed poking_mm to text_poke_mm.
	sym, ok := k.Symbol("text_poke_mm")
	if !ok {
		if sym, ok = k.Symbol("poking_mm"); !ok {
			return 0, errors.New("no text_poke_mm or poking_mm symbol")
		}
	}
	if off == nil || !off.MMPgd.Known() {
		return 0, errors.New("mm_struct.pgd offset unknown")
	}
	mm, err := k.ReadU64(sym)
	if err != nil || mm == 0 {
		return 0, fmt.Errorf("poking_mm: %#x, %v", mm, err)
	}
	pgd, err := k.ReadU64(mm + uint64(off.MMPgd.Value))
	if err != nil {
		return 0, fmt.Errorf("poking_mm->pgd: %w", err)
	}
	pa, err := k.VirtToPhys(pgd)
	if err != nil {
		return 0, fmt.Errorf("poking_mm->pgd %#x: %w", pgd, err)
	}
	return pa, nil
}
