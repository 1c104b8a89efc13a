package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cilium/ebpf/btf"

	"github.com/kvmscope/kvmscope/guestmem"
)

// startKernelMap is __START_KERNEL_map, where the x86-64 kernel image is
// mapped (arch/x86/include/asm/page_64_types.h).
const startKernelMap = 0xffffffff80000000

// defaultTextVA is _text without KASLR: __START_KERNEL_map plus
// CONFIG_PHYSICAL_START (16 MiB by default).
const defaultTextVA = 0xffffffff81000000

// ErrNotFound is returned (wrapped) when something the kernel should hold
// cannot be found in guest memory.
var ErrNotFound = errors.New("not found in guest memory")

// Record is what Discover found out about the guest's Linux kernel, as
// `kvmscope kernel --json` prints it: values, not a way to read memory.
type Record struct {
	// PGD is the guest physical address of the kernel's top page table.
	PGD uint64 `json:"pgd"`
	// PhysBase is the guest physical address of _text.
	PhysBase uint64 `json:"phys_base"`
	// TextVA is the virtual address of _text, KASLR applied.
	TextVA uint64 `json:"text_va"`
	// KASLRShift is TextVA - 0xffffffff81000000.
	KASLRShift int64 `json:"kaslr_shift"`
	// Bases of the direct map, struct page array and vmalloc area, which
	// CONFIG_RANDOMIZE_MEMORY moves (arch/x86/mm/kaslr.c).
	PageOffsetBase uint64 `json:"page_offset_base"`
	VmemmapBase    uint64 `json:"vmemmap_base"`
	VmallocBase    uint64 `json:"vmalloc_base"`
	// Levels is the number of page-table levels, 4 or 5 (LA57).
	Levels int `json:"paging_levels"`
	// Banner is linux_banner, "Linux version ...", without the newline.
	Banner  string        `json:"banner"`
	Version KernelVersion `json:"version"`
	// Found says where each of the values above came from, e.g.
	// "pgd": "init_top_pgt" or "found by structure".
	Found map[string]string `json:"found"`
}

// Kernel reads the guest's Linux kernel: the Record Discover made, the
// kernel's symbols and types, and the memory and page tables it reads
// guest memory through (Kernel.On binds it to another source).
type Kernel struct {
	Record
	Mem guestmem.Memory
	// AS is the kernel's address space, rooted at init_top_pgt
	// (swapper_pg_dir), which holds no user mappings.
	AS   *guestmem.AddressSpace
	Syms *Kallsyms
	// BTF is the kernel's own type information, nil when it has none.
	BTF *btf.Spec

	// imageSize is the size of the image from _text: reads inside it
	// need no page walk (it is mapped linearly).
	imageSize uint64
	image     []byte // the image, cached during Discover only
	level2    uint64 // guest physical address of level2_kernel_pgt
	ramEnd    uint64 // end of the highest RAM region: the direct map's extent
	logf      func(format string, args ...any)
}

// KernelVersion is the major.minor.patch of a Linux kernel; for
// distribution kernels the patch is the upstream one the banner names
// ("Debian 6.1.192-2"), not the ABI number in the release ("6.1.0-56").
type KernelVersion struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
	Patch int `json:"patch"`
}

func (v KernelVersion) String() string {
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch)
}

// AtLeast reports whether v is major.minor or newer.
func (v KernelVersion) AtLeast(major, minor int) bool {
	return v.Major > major || v.Major == major && v.Minor >= minor
}

// DiscoverOptions tunes Discover. The zero value is fine.
type DiscoverOptions struct {
	// CPUs, when given, are used to cross-check what was found in memory
	// (CR3 against the page-table root, CR4.LA57 against the levels).
	CPUs []guestmem.CPU
	// Log, when set, receives progress messages.
	Log func(format string, args ...any)
}

// Symbol returns the address of the kernel symbol name.
func (k *Kernel) Symbol(name string) (uint64, bool) {
	if k.Syms == nil {
		return 0, false
	}
	return k.Syms.Lookup(name)
}

// SymbolAt returns the symbol that contains va and va's offset into it.
func (k *Kernel) SymbolAt(va uint64) (name string, off uint64, ok bool) {
	if k.Syms == nil {
		return "", 0, false
	}
	return k.Syms.At(va)
}

// ReadVirt reads len(p) bytes at kernel virtual address va.
func (k *Kernel) ReadVirt(p []byte, va uint64) error {
	for len(p) > 0 {
		// Page by page: contiguous virtual pages need not be contiguous
		// physically, except in the image and the direct map, which are
		// read in one piece (BTF is megabytes).
		n := min(uint64(len(p)), 0x1000-va&0xfff)
		pa, end, ok := k.linear(va)
		if ok {
			n = min(uint64(len(p)), end-va)
		} else {
			var err error
			if pa, err = k.VirtToPhys(va); err != nil {
				return err
			}
		}
		if _, err := k.Mem.ReadAt(p[:n], int64(pa)); err != nil {
			return fmt.Errorf("read kernel va %#x (pa %#x): %w", va, pa, err)
		}
		p = p[n:]
		va += n
	}
	return nil
}

// ReadU64 reads a little-endian uint64 at kernel virtual address va.
func (k *Kernel) ReadU64(va uint64) (uint64, error) {
	var b [8]byte
	if err := k.ReadVirt(b[:], va); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// ReadU32 reads a little-endian uint32 at kernel virtual address va.
func (k *Kernel) ReadU32(va uint64) (uint32, error) {
	var b [4]byte
	if err := k.ReadVirt(b[:], va); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b[:]), nil
}

// ReadPtr reads a kernel pointer at va.
func (k *Kernel) ReadPtr(va uint64) (uint64, error) { return k.ReadU64(va) }

// Reset drops the page-table translations cached in k.AS. A live guest
// changes its page tables (vmalloc, modules, process PGDs): call Reset
// before each scan so it sees them as they are now. What Discover found
// (image, symbols, bases, BTF) stays valid while the guest runs.
func (k *Kernel) Reset() {
	if k.AS != nil {
		k.AS.Reset()
	}
}

// PhysToVirt returns the direct-map (page_offset_base) address of pa.
func (k *Kernel) PhysToVirt(pa uint64) uint64 { return k.PageOffsetBase + pa }

// linear translates va when it is in the image or the direct map, which
// need no page walk, and returns the end of that mapping.
func (k *Kernel) linear(va uint64) (pa, end uint64, ok bool) {
	if va >= k.TextVA && va-k.TextVA < k.imageSize {
		return k.PhysBase + (va - k.TextVA), k.TextVA + k.imageSize, true
	}
	if k.PageOffsetBase != 0 && va >= k.PageOffsetBase && va-k.PageOffsetBase < k.ramEnd {
		return va - k.PageOffsetBase, k.PageOffsetBase + k.ramEnd, true
	}
	return 0, 0, false
}

// VirtToPhys translates a kernel virtual address. The kernel image and the
// direct map are linear and need no page walk (most kernel objects, from
// slab, are in the direct map); anything else (vmalloc, modules, vmemmap)
// goes through the kernel's page tables.
func (k *Kernel) VirtToPhys(va uint64) (uint64, error) {
	if pa, _, ok := k.linear(va); ok {
		return pa, nil
	}
	if k.AS == nil {
		return 0, fmt.Errorf("translate %#x: no kernel page tables", va)
	}
	pa, err := k.AS.Translate(va)
	if err != nil {
		return 0, fmt.Errorf("translate %#x: %w", va, err)
	}
	return pa, nil
}

// Discover finds the guest Linux kernel in mem: no profile and no
// registers needed. CPUs in opts, when given, are used to cross-check.
func Discover(mem guestmem.Memory, opts DiscoverOptions) (*Kernel, error) {
	return discover(mem, opts, nil)
}

// discover is Discover; tests pass filter to drop symbols, as a kernel
// without CONFIG_KALLSYMS_ALL (text symbols only) would.
func discover(mem guestmem.Memory, opts DiscoverOptions, filter func(*Kallsyms) *Kallsyms) (*Kernel, error) {
	logf := opts.Log
	if logf == nil {
		logf = func(string, ...any) {}
	}
	regions := mem.Regions()
	var k *Kernel
	h, err := findKallsyms(mem, regions, codeHint(mem, opts.CPUs), logf, func(h *kallsymsHit) error {
		if filter != nil {
			h.syms = filter(h.syms)
		}
		k = &Kernel{Record: Record{Found: map[string]string{"kallsyms": h.syms.Layout()}}, Mem: mem, Syms: h.syms, logf: logf}
		if err := k.locateImage(h, regions, opts.CPUs); err != nil {
			return fmt.Errorf("kernel image: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("discover kernel: %w", err)
	}
	defer func() { k.image = nil }()
	if err := k.findPageTables(h, regions, opts.CPUs); err != nil {
		return nil, fmt.Errorf("discover kernel page tables: %w", err)
	}
	if err := k.findBases(); err != nil {
		return nil, fmt.Errorf("discover memory layout: %w", err)
	}
	for _, r := range regions {
		k.ramEnd = max(k.ramEnd, r.End())
	}
	if err := k.findBanner(); err != nil {
		return nil, fmt.Errorf("discover kernel version: %w", err)
	}
	if err := k.loadBTF(); err != nil {
		// The kernel works without BTF (offsets are then solved); a
		// damaged BTF must not hide the rest.
		logf("BTF: %v", err)
	}
	return k, nil
}

// imageBytes returns the kernel image (_text to its end) from physical
// memory, read once per Discover.
func (k *Kernel) imageBytes() ([]byte, error) {
	if k.image == nil {
		img := make([]byte, k.imageSize)
		if _, err := k.Mem.ReadAt(img, int64(k.PhysBase)); err != nil {
			return nil, fmt.Errorf("read kernel image: %w", err)
		}
		k.image = img
	}
	return k.image, nil
}

// On returns k reading guest memory through mem, with a page-table cache
// of its own: make one per scan, so that nothing read of the guest is kept
// from one scan to the next.
func (k *Kernel) On(mem guestmem.Memory) *Kernel {
	kc := *k
	kc.Mem = mem
	kc.image = nil
	if k.AS != nil {
		kc.AS = guestmem.NewAddressSpace(mem, k.AS.Root(), k.AS.Levels())
	}
	return &kc
}

// Check reports whether k still describes the kernel in guest memory:
// init_task, read where k says it is, must be the idle task ("swapper",
// "swapper/0"). A guest that rebooted into another kernel, or into the
// same one at another KASLR slide, fails it. Without init_task or its
// comm offset there is nothing to check against.
func (k *Kernel) Check(off *Offsets) error {
	initTask, ok := k.Symbol("init_task")
	if !ok || !off.TaskComm.Known() {
		return nil
	}
	var comm [16]byte
	if err := k.ReadVirt(comm[:], initTask+uint64(off.TaskComm.Value)); err != nil {
		return fmt.Errorf("check the kernel found before: init_task: %w", err)
	}
	if !bytes.HasPrefix(comm[:], []byte("swapper")) {
		return fmt.Errorf("check the kernel found before: init_task's comm is %q, not swapper: the guest runs another kernel now", bytes.TrimRight(comm[:], "\x00"))
	}
	return nil
}
