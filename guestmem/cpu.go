package guestmem

import "time"

// CPU is the architectural state of one x86-64 vCPU that introspection
// needs. Values are as the guest sees them.
type CPU struct {
	ID     int    `json:"id"`
	RIP    uint64 `json:"rip"`
	RSP    uint64 `json:"rsp"`
	RFLAGS uint64 `json:"rflags"`
	CR0    uint64 `json:"cr0"`
	CR2    uint64 `json:"cr2"`
	CR3    uint64 `json:"cr3"`
	CR4    uint64 `json:"cr4"`
	EFER   uint64 `json:"efer"`

	CSBase uint64 `json:"cs_base"`
	DSBase uint64 `json:"ds_base"`
	SSBase uint64 `json:"ss_base"`
	FSBase uint64 `json:"fs_base"`
	GSBase uint64 `json:"gs_base"`
	// KernelGSBase is MSR_KERNEL_GS_BASE (the value swapgs exchanges with
	// GSBase); zero when the source does not provide it.
	KernelGSBase uint64 `json:"kernel_gs_base,omitempty"`

	// CSL and CSDB are the L and D/B bits of the code segment descriptor;
	// with CR0.PE and EFER.LMA they decide the CPU mode.
	CSL  bool `json:"cs_l"`
	CSDB bool `json:"cs_db"`

	// IDTBase and IDTLimit are the IDTR: where the vCPU's interrupt
	// descriptor table is (a kernel virtual address).
	IDTBase  uint64 `json:"idt_base"`
	IDTLimit uint16 `json:"idt_limit"`

	// Entry holds the system-call entry MSRs, when the source knows them
	// (nil otherwise: sync regs and dumps carry no MSRs).
	Entry *EntryMSRs `json:"entry_msrs,omitempty"`
}

// EntryMSRs are the MSRs that say where the CPU enters the kernel on a
// system call: LSTAR for syscall in 64-bit mode, CSTAR for syscall in
// compatibility mode, SYSENTER_EIP for sysenter.
type EntryMSRs struct {
	LSTAR       uint64 `json:"lstar"`
	CSTAR       uint64 `json:"cstar"`
	SysenterEIP uint64 `json:"sysenter_eip"`
	// At is when the hypervisor reported them.
	At time.Time `json:"at"`
}

// The MSR numbers of EntryMSRs (Intel SDM vol. 4, table 2-2).
const (
	MSRSysenterEIP  = 0x176
	MSRLSTAR        = 0xc0000082
	MSRCSTAR        = 0xc0000083
	MSRKernelGSBase = 0xc0000102
)

// Control register and EFER bits used to decide the mode and paging format.
// See the Intel SDM vol. 3, chapter 2.5 and 4.
const (
	CR0PE   = 1 << 0
	CR0PG   = 1 << 31
	CR4PAE  = 1 << 5
	CR4LA57 = 1 << 12
	CR4PCID = 1 << 17
	EFERLME = 1 << 8
	EFERLMA = 1 << 10
)

// Mode names the CPU's operating mode: "real", "protected", "compat"
// (32-bit code in long mode) or "long".
func (c CPU) Mode() string {
	switch {
	case c.CR0&CR0PE == 0:
		return "real"
	case c.EFER&EFERLMA != 0 && c.CSL:
		return "long"
	case c.EFER&EFERLMA != 0:
		return "compat"
	default:
		return "protected"
	}
}

// Paging reports how many page-table levels the vCPU uses: 0 when paging is
// off, 2 for 32-bit, 3 for PAE, 4 or 5 in long mode.
func (c CPU) Paging() int {
	switch {
	case c.CR0&CR0PG == 0:
		return 0
	case c.EFER&EFERLMA != 0 && c.CR4&CR4LA57 != 0:
		return 5
	case c.EFER&EFERLMA != 0:
		return 4
	case c.CR4&CR4PAE != 0:
		return 3
	default:
		return 2
	}
}
