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
// table, the CR3 text_poke runs with (PCID and flag bits aside). It needs
// no solved offsets: when mm_struct.pgd is not known yet (a guest without
// BTF early in boot, before user processes exist to solve it from), the
// one pointer in poking_mm that looks like a PGD is taken.
func (k *Kernel) PokingPGD(off *Offsets) (uint64, error) {
	// Linux 6.16 renamed poking_mm to text_poke_mm.
	sym, ok := k.Symbol("text_poke_mm")
	if !ok {
		if sym, ok = k.Symbol("poking_mm"); !ok {
			return 0, errors.New("no text_poke_mm or poking_mm symbol")
		}
	}
	mm, err := k.ReadU64(sym)
	if err != nil || mm == 0 || !k.kernelPtr(mm) {
		return 0, fmt.Errorf("poking_mm: %#x, %v", mm, err)
	}
	var pgd uint64
	if off != nil && off.MMPgd.Known() {
		if pgd, err = k.ReadU64(mm + uint64(off.MMPgd.Value)); err != nil {
			return 0, fmt.Errorf("poking_mm->pgd: %w", err)
		}
	} else if pgd, err = k.findPGDField(mm); err != nil {
		return 0, fmt.Errorf("poking_mm at %#x (mm_struct.pgd not solved): %w", mm, err)
	}
	pa, err := k.VirtToPhys(pgd)
	if err != nil {
		return 0, fmt.Errorf("poking_mm->pgd %#x: %w", pgd, err)
	}
	return pa, nil
}

// findPGDField returns the value of the one field in the first mmWindow
// bytes of the mm_struct at mm that points to a PGD (pgd_alloc copies the
// kernel half of swapper_pg_dir into each; see looksLikePGD).
func (k *Kernel) findPGDField(mm uint64) (uint64, error) {
	half, err := k.kernelPGDHalf()
	if err != nil {
		return 0, err
	}
	b := make([]byte, mmWindow)
	if err := k.ReadVirt(b, mm); err != nil {
		return 0, err
	}
	var found []uint64
	for o := 0; o+8 <= len(b); o += 8 {
		if v := le64(b, o); k.looksLikePGD(v, half) {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		return 0, fmt.Errorf("%d fields look like a pgd, want 1", len(found))
	}
	return found[0], nil
}
