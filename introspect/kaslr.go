package introspect

import (
	"encoding/binary"
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
)

// KASLR (CONFIG_RANDOMIZE_BASE) moves the kernel image physically and
// virtually, independently, in 2 MiB steps; CONFIG_RANDOMIZE_MEMORY moves
// the direct map, vmalloc area and vmemmap (arch/x86/mm/kaslr.c).

// Bases of the randomized regions when CONFIG_RANDOMIZE_MEMORY is off
// (Documentation/arch/x86/x86_64/mm.rst).
var defaultBases = map[int][3]uint64{
	4: {0xffff888000000000, 0xffffc90000000000, 0xffffea0000000000},
	5: {0xff11000000000000, 0xffa0000000000000, 0xffd4000000000000},
}

// maxImage bounds the kernel image size (a distribution kernel's is
// 40-60 MiB with .bss); more comes from forged page tables.
const maxImage = 256 << 20

// locateImage finds the image's physical base and virtual address from
// the kallsyms tables and level2_kernel_pgt (found through cpus' page
// tables when given).
func (k *Kernel) locateImage(h *kallsymsHit, regions []guestmem.Region, cpus []guestmem.CPU) error {
	ks := h.syms
	text, ok := ks.Lookup("_text")
	if !ok {
		if text, ok = ks.Lookup("_stext"); !ok {
			return fmt.Errorf("kallsyms has no _text or _stext: %w", ErrNotFound)
		}
	}
	var l2 level2
	var err error
	if ks.relative {
		// 7.x: addresses are known relative to kallsyms_offsets, whose
		// physical address is known, so _text's physical address is too;
		// level2_kernel_pgt then tells where it is mapped.
		table := h.bufGPA + uint64(ks.tableOff)
		k.PhysBase = table + text
		l2, err = findLevel2(k.Mem, regions, cpus, h.hit, func(i0 int, pa0 uint64) bool {
			return pa0 == k.PhysBase&^(pmdSize-1)
		})
		if err != nil {
			return err
		}
		k.TextVA = startKernelMap + uint64(l2.first)*pmdSize + k.PhysBase%pmdSize
		ks.relocate(k.TextVA + (table - k.PhysBase))
		k.Found["phys_base"] = "kallsyms (PC-relative offsets)"
		k.Found["text_va"] = "level2_kernel_pgt"
	} else {
		// Absolute addresses (relocated at boot): _text's virtual
		// address picks the entry of level2_kernel_pgt that maps it.
		if text < startKernelMap || text-startKernelMap >= 1<<30 {
			return fmt.Errorf("_text %#x is outside the kernel image area", text)
		}
		k.TextVA = text
		j := int((text - startKernelMap) / pmdSize)
		l2, err = findLevel2(k.Mem, regions, cpus, h.hit, func(i0 int, pa0 uint64) bool { return i0 == j })
		if err != nil {
			return err
		}
		k.PhysBase = l2.pa + text%pmdSize
		k.Found["text_va"] = "kallsyms _text"
		k.Found["phys_base"] = "level2_kernel_pgt"
	}
	k.level2 = l2.gpa
	k.KASLRShift = int64(k.TextVA - defaultTextVA)
	k.imageSize = uint64(l2.last-l2.first+1)*pmdSize - k.PhysBase%pmdSize
	if end, ok := ks.Lookup("_end"); ok && end > k.TextVA && end-k.TextVA <= k.imageSize {
		k.imageSize = end - k.TextVA
	}
	if k.imageSize > maxImage {
		return fmt.Errorf("level2_kernel_pgt maps %d MiB from _text: not a kernel image", k.imageSize>>20)
	}
	if h.hit < k.PhysBase || h.hit-k.PhysBase >= k.imageSize {
		return fmt.Errorf("kallsyms at %#x lies outside the image %#x+%#x that level2_kernel_pgt maps", h.hit, k.PhysBase, k.imageSize)
	}
	k.logf("kernel image: _text va %#x pa %#x, %d MiB, KASLR shift %#x", k.TextVA, k.PhysBase, k.imageSize>>20, k.KASLRShift)
	return nil
}

// findPageTables finds the kernel's top-level page table and the number
// of paging levels, and checks them against the vCPUs when given.
func (k *Kernel) findPageTables(h *kallsymsHit, regions []guestmem.Region, cpus []guestmem.CPU) error {
	var pgd uint64
	levels := 0
	sym := ""
	for _, name := range []string{"init_top_pgt", "init_level4_pgt"} {
		if va, ok := k.Symbol(name); ok {
			pa, err := k.VirtToPhys(va)
			if err != nil {
				return err
			}
			pgd, sym = pa, name
			break
		}
	}
	if sym == "" {
		var err error
		if pgd, levels, err = findPGD(k.Mem, regions, h.hit, k.level2); err != nil {
			return err
		}
		sym = "found by structure"
	}
	k.Found["pgd"] = sym
	k.Found["paging_levels"] = "page-table shape"
	// The levels: from a vCPU's CR4.LA57, else from the shape of the
	// tables under the PGD's last entry (PGD → level3_kernel_pgt →
	// level2_kernel_pgt with 4 levels, one more table with 5).
	for _, c := range cpus {
		if p := c.Paging(); p >= 4 {
			levels = p
			k.Found["paging_levels"] = "CR4.LA57"
			break
		}
	}
	if levels == 0 {
		var err error
		if levels, err = k.pgdLevels(pgd); err != nil {
			return err
		}
	}
	k.PGD, k.Levels = pgd, levels
	k.AS = guestmem.NewAddressSpace(k.Mem, pgd, levels)
	pa, err := k.AS.Translate(k.TextVA)
	if err != nil {
		return fmt.Errorf("kernel page tables at %#x (%s): translate _text: %w", pgd, sym, err)
	}
	if pa != k.PhysBase {
		return fmt.Errorf("kernel page tables at %#x (%s) map _text to %#x, not %#x", pgd, sym, pa, k.PhysBase)
	}
	for _, c := range cpus {
		if c.Paging() < 4 {
			continue
		}
		if err := k.checkCPU(c); err != nil {
			return err
		}
	}
	k.logf("kernel page tables: %#x (%s), %d levels", pgd, sym, levels)
	return nil
}

// pgdLevels tells 4- from 5-level paging by the chain of last entries.
func (k *Kernel) pgdLevels(pgd uint64) (int, error) {
	t := pgd
	for lv := 4; lv <= 5; lv++ {
		next, err := k.entry(t, 511)
		if err != nil {
			return 0, err
		}
		if next == 0 {
			break
		}
		e, err := k.entry(next, 510)
		if err != nil {
			return 0, err
		}
		if e == k.level2 {
			return lv, nil
		}
		t = next
	}
	return 0, fmt.Errorf("page table %#x does not lead to level2_kernel_pgt %#x", pgd, k.level2)
}

// entry reads entry i of the page table at gpa and returns the table or
// page it points to (0 when not present).
func (k *Kernel) entry(gpa uint64, i int) (uint64, error) {
	e, err := k.pte(gpa, i)
	if err != nil || e&guestmem.PTEPresent == 0 {
		return 0, err
	}
	return e & guestmem.PTEAddrMask, nil
}

// findBases sets page_offset_base, vmalloc_base and vmemmap_base: the
// kernel's variables when kallsyms has them, else the fixed defaults
// when the page tables show no randomization, else the regions as the
// kernel's page tables lay them out.
func (k *Kernel) findBases() error {
	names := [3]string{"page_offset_base", "vmalloc_base", "vmemmap_base"}
	dst := [3]*uint64{&k.PageOffsetBase, &k.VmallocBase, &k.VmemmapBase}
	found := 0
	for i, n := range names {
		if va, ok := k.Symbol(n); ok {
			v, err := k.ReadU64(va)
			if err != nil {
				return fmt.Errorf("read %s: %w", n, err)
			}
			*dst[i] = v
			found++
		}
	}
	if found == 3 {
		return k.checkDirectMap("kallsyms")
	}
	def := defaultBases[k.Levels]
	k.PageOffsetBase, k.VmallocBase, k.VmemmapBase = def[0], def[1], def[2]
	if err := k.checkDirectMap("default"); err == nil {
		return nil
	}
	return k.basesFromPGD()
}

// checkDirectMap checks that page_offset_base maps physical address 0.
func (k *Kernel) checkDirectMap(from string) error {
	pa, err := k.AS.Translate(k.PageOffsetBase)
	if err != nil {
		return fmt.Errorf("page_offset_base %#x (%s): %w", k.PageOffsetBase, from, err)
	}
	if pa != 0 {
		return fmt.Errorf("page_offset_base %#x (%s) maps physical %#x, not 0", k.PageOffsetBase, from, pa)
	}
	k.logf("page_offset_base %#x, vmalloc_base %#x, vmemmap_base %#x (%s)", k.PageOffsetBase, k.VmallocBase, k.VmemmapBase, from)
	k.Found["page_offset_base"] = from
	return nil
}

// basesFromPGD finds the randomized regions in the kernel half of the
// PGD. kernel_randomize_memory places, in this order and each aligned
// (1 GiB with 4 levels, 512 GiB with 5), the direct map, vmalloc and
// vmemmap between __PAGE_OFFSET_BASE and the CPU entry area; each region
// starts with mappings (physical address 0; the first vmalloc
// allocations; the struct pages of the first memory section), so each
// base is the first mapped gigabyte after the previous region.
func (k *Kernel) basesFromPGD() error {
	const cpuEntryArea = 0xfffffe0000000000
	start, vmallocSize := uint64(0xffff888000000000), uint64(32<<40) // VMALLOC_SIZE_TB
	if k.Levels == 5 {
		start, vmallocSize = 0xff11000000000000, 12800<<40
	}
	var mapped []uint64
	budget := maxPTEReads
	if err := k.mappedGiB(k.PGD, k.Levels, 0, start, cpuEntryArea, &mapped, &budget); err != nil {
		return err
	}
	if len(mapped) == 0 {
		return fmt.Errorf("page_offset_base: kernel half of PGD %#x maps nothing", k.PGD)
	}
	k.PageOffsetBase = mapped[0]
	var ramEnd uint64
	for _, r := range k.Mem.Regions() {
		ramEnd = max(ramEnd, r.End())
	}
	next := func(after uint64) uint64 {
		for _, va := range mapped {
			if va >= after {
				return va
			}
		}
		return 0
	}
	k.VmallocBase = next(k.PageOffsetBase + (ramEnd+1<<30-1)&^(1<<30-1))
	k.VmemmapBase = next(k.VmallocBase + vmallocSize)
	if k.VmallocBase == 0 || k.VmemmapBase == 0 {
		return fmt.Errorf("vmalloc/vmemmap regions not found in PGD %#x", k.PGD)
	}
	return k.checkDirectMap("page-table layout")
}

// Bounds on the walk of basesFromPGD: forged page tables can mark every
// entry present.
const (
	maxMappedGiB = 1 << 16
	maxPTEReads  = 1 << 20
)

// mappedGiB appends to out, in order, the 1 GiB-aligned virtual
// addresses in [start, end) that the table at gpa (at level lv, covering
// addresses from base) maps something in.
func (k *Kernel) mappedGiB(gpa uint64, lv int, base, start, end uint64, out *[]uint64, budget *int) error {
	shift := uint(12 + 9*(lv-1))
	for i := 0; i < 512 && len(*out) < maxMappedGiB; i++ {
		va := base | uint64(i)<<shift
		if lv == k.Levels && i >= 256 {
			va |= ^uint64(0) << (shift + 9) // sign-extend the kernel half
		}
		size := uint64(1) << shift
		if va+size-1 < start || va >= end {
			continue
		}
		if *budget--; *budget < 0 {
			return fmt.Errorf("page tables under %#x: more than %d entries", k.PGD, maxPTEReads)
		}
		e, err := k.pte(gpa, i)
		if err != nil {
			return err
		}
		if e&guestmem.PTEPresent == 0 {
			continue
		}
		if lv == 3 || e&guestmem.PTEPS != 0 {
			*out = append(*out, va)
			continue
		}
		if err := k.mappedGiB(e&guestmem.PTEAddrMask, lv-1, va, start, end, out, budget); err != nil {
			return err
		}
	}
	return nil
}

// pte reads entry i of the page table at gpa, flags included.
func (k *Kernel) pte(gpa uint64, i int) (uint64, error) {
	var b [8]byte
	if _, err := k.Mem.ReadAt(b[:], int64(gpa+uint64(i)*8)); err != nil {
		return 0, fmt.Errorf("read page table %#x: %w", gpa, err)
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// checkCPU checks that a vCPU's page tables map _text where memory says.
// Every Linux page table maps the kernel image.
func (k *Kernel) checkCPU(c guestmem.CPU) error {
	as, err := guestmem.KernelAddressSpace(k.Mem, c.CR3, c.Paging(), k.TextVA)
	if err != nil {
		return fmt.Errorf("cpu %d: %w", c.ID, err)
	}
	pa, err := as.Translate(k.TextVA)
	if err != nil {
		return fmt.Errorf("cpu %d: %w", c.ID, err)
	}
	if pa != k.PhysBase {
		return fmt.Errorf("cpu %d: CR3 %#x maps _text to %#x, memory says %#x", c.ID, c.CR3, pa, k.PhysBase)
	}
	return nil
}
