package introspect

import (
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
)

// The vCPU side of the dispatch: where the CPU enters the kernel on a
// syscall (LSTAR), and the control-register bits that keep kernel text
// and user memory out of a rootkit's reach.
const (
	cr0WP   = 1 << 16 // write protect: ring 0 honours read-only pages
	cr4SMEP = 1 << 20 // no execution of user pages in ring 0
	cr4SMAP = 1 << 21 // no access to user pages in ring 0 without stac

	// cpuEntryArea is where kernels 4.15-5.x put the PTI trampoline
	// LSTAR may point to (arch/x86/include/asm/pgtable_64_types.h).
	cpuEntryAreaStart = 0xfffffe0000000000
	cpuEntryAreaEnd   = 0xfffffe8000000000
)

// JudgeCPUs checks each vCPU in long mode: CR0.WP set (Linux always sets
// it; rootkits clear it to patch read-only text); SMEP and SMAP on every
// vCPU if on any (a CPU without them shows them clear everywhere); and,
// where the source read it, LSTAR at entry_SYSCALL_64 (or the PTI
// trampoline). notes say what could not be checked.
func (k *Kernel) JudgeCPUs(cpus []guestmem.CPU) (devs []Deviation, notes []string) {
	var smep, smap bool
	for _, c := range cpus {
		smep = smep || c.CR4&cr4SMEP != 0
		smap = smap || c.CR4&cr4SMAP != 0
	}
	lstarWant, haveSym := k.Symbol("entry_SYSCALL_64")
	lstarRead := false
	for _, c := range cpus {
		if c.Mode() != "long" {
			continue
		}
		cpu := fmt.Sprintf("vcpu%d", c.ID)
		if c.CR0&cr0WP == 0 {
			devs = append(devs, Deviation{What: cpu + ".cr0.wp", Kind: "cpu", Current: "0", Baseline: "1", Detail: "write protection is off in ring 0: the kernel can write its read-only text"})
		}
		if smep && c.CR4&cr4SMEP == 0 {
			devs = append(devs, Deviation{What: cpu + ".cr4.smep", Kind: "cpu", Current: "0", Baseline: "1", Detail: "SMEP is off on this vCPU and on on another"})
		}
		if smap && c.CR4&cr4SMAP == 0 {
			devs = append(devs, Deviation{What: cpu + ".cr4.smap", Kind: "cpu", Current: "0", Baseline: "1", Detail: "SMAP is off on this vCPU and on on another"})
		}
		if c.Entry == nil || !haveSym {
			continue
		}
		lstarRead = true
		l := c.Entry.LSTAR
		if l == lstarWant || (l >= cpuEntryAreaStart && l < cpuEntryAreaEnd) {
			continue
		}
		name, off, ok := k.SymbolAt(l)
		if ok && off == 0 && (name == "entry_SYSCALL_64" || name == "entry_SYSCALL_64_trampoline") {
			continue
		}
		d := Deviation{What: cpu + ".lstar", Kind: "msr", Current: fmt.Sprintf("%#x", l), Baseline: fmt.Sprintf("%#x", lstarWant), BaselineSymbol: "entry_SYSCALL_64+0x0", Detail: "the syscall entry MSR does not point at the kernel's entry"}
		if ok {
			d.CurrentSymbol = fmt.Sprintf("%s+%#x", name, off)
		}
		devs = append(devs, d)
	}
	if !smep {
		notes = append(notes, "SMEP is off on every vCPU (the CPU model may lack it)")
	}
	if !smap {
		notes = append(notes, "SMAP is off on every vCPU (the CPU model may lack it)")
	}
	if !lstarRead {
		notes = append(notes, "LSTAR not checked: this source does not carry the vCPUs' MSRs (dumps and TCG do not; KVM reads them through the tracer)")
	}
	return devs, notes
}
