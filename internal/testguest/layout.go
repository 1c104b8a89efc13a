package testguest

import "fmt"

// The guest's memory layout. Every address is guest-physical unless named
// VA. testdata/tinyguest/guest.s and guest.ld define the same values; Build
// checks the built ELF's symbols against these constants.
const (
	// PageSize is the size of one pattern page and of the small pages in
	// the guest's page tables.
	PageSize = 4096

	// CodeStart and CodeEnd bound the guest's code ([CodeStart, CodeEnd)):
	// every RIP of the boot CPU after the guest starts lies in it.
	CodeStart = 0x100000
	CodeEnd   = 0x104000

	// PML4GPA is the page-table root the guest loads into CR3 (no PCID,
	// no flag bits): the boot vCPU's CR3 equals it once the guest runs.
	PML4GPA = 0x104000

	// ImageEnd is the end of the loaded ELF image. QEMU's multiboot loader
	// puts the command line and multiboot info right after it.
	ImageEnd = 0x10e000

	// StatusGPA is the page where the guest publishes its state.
	StatusGPA = 0x10b000
	// ReadyGPA holds ReadyValue (uint64, little-endian) once the guest
	// is in long mode with paging on and has written all pattern pages.
	ReadyGPA = StatusGPA + 0x00
	// ReadyValue is "READY64\x00" read as a little-endian uint64.
	ReadyValue = 0x0034365944414552
	// BootMagicGPA holds the uint32 %eax the guest was entered with:
	// MultibootBootMagic when QEMU booted it through multiboot.
	BootMagicGPA = StatusGPA + 0x08
	// ModeGPA holds the uint64 mode chosen by the command line (ModeSpin,
	// ModeExit, ModeIO, ModeGuard or ModeRegs) and ArgGPA its argument N.
	ModeGPA = StatusGPA + 0x10
	ArgGPA  = StatusGPA + 0x18
	// IODoneGPA holds the number of port writes done, set in io mode just
	// before the guest exits.
	IODoneGPA = StatusGPA + 0x20
	// CmdlineGPA holds the uint64 address of the command line the guest
	// parsed (0 when it got none).
	CmdlineGPA = StatusGPA + 0x28
	// CounterGPA holds the uint64 counter that the spinning guest
	// increments forever (1e5 to 3e5 per second on the development
	// machines' emulating KVM; far more with hardware virtualization).
	CounterGPA = StatusGPA + 0x40
	// In guard mode (guard=N): the guest waits until GoGPA is non-zero,
	// makes N stores of GuardValue at GuardTargetVA (pattern page 0, which
	// the host protects), one at GuardNeighbourVA (page 1), M stores at
	// page 2 (touch=M, TouchGPA), then publishes what the target held
	// (GuardSeenGPA), sets GuardDoneGPA to 1 and spins as mode spin does.
	// The symbol guard_store (Symbol) is the store instruction.
	GoGPA        = StatusGPA + 0x48
	GuardSeenGPA = StatusGPA + 0x50
	GuardDoneGPA = StatusGPA + 0x58
	TouchGPA     = StatusGPA + 0x60
	GuardValue   = 0x2144454b434f4c42 // "BLOCKED!"
	// GuardTargetGPA is where the guarded store goes, GuardTargetVA the
	// address the guest uses; the neighbour is the same offset in page 1.
	GuardTargetGPA    = PatternGPA + 0x100
	GuardTargetVA     = PatternVA + 0x100
	GuardNeighbourGPA = PatternGPA + 0x1100

	// In regs mode (the word regs): the guest spins incrementing the
	// counter until %r15 holds RegsMagic (no other guest code touches
	// %r15, so only a host register write can put it there), then stores
	// %r14 at RegsSeenGPA, sets RegsDoneGPA to 1 and spins as mode spin
	// does. The symbol regs_exit (Symbol) writes %eax to isa-debug-exit:
	// a host that sets %rip there makes QEMU exit with ExitStatus(%eax).
	RegsSeenGPA = StatusGPA + 0x68
	RegsDoneGPA = StatusGPA + 0x70
	RegsMagic   = 0x5347455245504f43 // "COPEREGS"
	// Until then it stores what rdmsr reads of MSR_KERNEL_GS_BASE (which
	// no guest code writes) at MSRSeenGPA at every turn of its loop.
	MSRSeenGPA = StatusGPA + 0x78

	// PatternGPA is the first of PatternPages consecutive 4 KiB pages
	// whose contents PatternFor gives. They are covered by a 2 MiB page
	// of the identity map.
	PatternGPA   = 0x200000
	PatternPages = 8
	// PatternVA maps the same pages through 4 KiB page-table entries
	// (PML4 index 511, PDPT 510, PD 3, PT 0..7): PatternVA + i*PageSize
	// translates to PatternGPA + i*PageSize. The guest writes the patterns
	// through this mapping.
	PatternVA = 0xffffffff80600000

	// IdentityMapEnd: virtual addresses below it map to the same physical
	// address, except the page at 0, which is not present. The first
	// 2 MiB use 4 KiB pages, the rest 2 MiB pages.
	IdentityMapEnd = 1 << 30

	// DebugExitPort is the iobase of QEMU's isa-debug-exit device. A
	// guest write of N makes QEMU exit with status ExitStatus(N).
	DebugExitPort = 0xf4
	// IOPort is the port that io=N writes to N times: no device decodes
	// it on pc or q35, so each write is a KVM_EXIT_IO handled by QEMU.
	IOPort = 0x950

	// LSTARValue is what the guest writes to MSR_LSTAR at start-up.
	LSTARValue = 0xffffffff80601000

	// MultibootBootMagic is the %eax value of a multiboot (v1) entry.
	MultibootBootMagic = 0x2badb002

	// MemoryMiB is the guest RAM size QEMUArgs asks for.
	MemoryMiB = 64
)

// Modes, as stored at ModeGPA.
const (
	ModeSpin  = 0 // no exit=/io= word: spin incrementing the counter
	ModeExit  = 1 // exit=N
	ModeIO    = 2 // io=N
	ModeGuard = 3 // guard=N
	ModeRegs  = 4 // regs
)

// ExitStatus is the exit status of QEMU when the guest writes n to
// isa-debug-exit: QEMU calls exit((n << 1) | 1), of which the parent sees
// the low 8 bits. So exit=5 gives 11 and io=N (which writes 0) gives 1.
func ExitStatus(n int) int {
	return (n<<1 | 1) & 0xff
}

// patternLine is the 32-byte line repeated over each pattern page; the
// first %04x is the page index, the second PatternPages.
const patternLine = "KVMSCOPE-PATTERN page %04x/%04x\n"

// PatternFor returns the exact PageSize bytes the guest writes to pattern
// page i (at PatternGPA + i*PageSize): the line
// "KVMSCOPE-PATTERN page 0003/0008\n" (page index and page count in hex)
// repeated 128 times. It returns nil when i is out of range.
func PatternFor(i int) []byte {
	if i < 0 || i >= PatternPages {
		return nil
	}
	line := fmt.Sprintf(patternLine, i, PatternPages)
	page := make([]byte, 0, PageSize)
	for len(page) < PageSize {
		page = append(page, line...)
	}
	return page
}
