//go:build linux && amd64

package tracer

// KVM ioctl numbers and structure layouts for x86-64.
// See include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.
const (
	KVMGetAPIVersion            = 0xae00
	KVMCreateVM                 = 0xae01
	KVMGetVCPUMmapSize          = 0xae04
	KVMCreateVCPU               = 0xae41
	KVMRun                      = 0xae80 // never trapped; tracer/kvmprobe's probes issue it
	KVMSetUserMemoryRegion      = 0x4020ae46
	kvmSetUserMemoryRegion2     = 0x40a0ae49
	kvmCheckExtension           = 0xae03
	kvmCapNrMemslots            = 10
	kvmExitMMIO                 = 6
	kvmRunMMIOOffset            = 32 // offsetof(struct kvm_run, mmio): phys_addr, data[8], len, is_write
	kvmMemLogDirtyPages         = 1 << 0
	kvmMemReadonly              = 1 << 1
	kvmMemGuestMemfd            = 1 << 2
	kvmSyncX86Regs              = 1 << 0
	kvmSyncX86Sregs             = 1 << 1
	kvmSyncX86Events            = 1 << 2
	kvmRunValidRegsOffset       = 288 // offsetof(struct kvm_run, kvm_valid_regs)
	kvmRunSyncRegsOffset        = 304 // offsetof(struct kvm_run, s.regs)
	KVMRunExitReasonOffset      = 8
	kvmUserspaceMemoryRegionLen = 32 // the prefix shared by region and region2
)

// KVMRegs mirrors struct kvm_regs.
type KVMRegs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// KVMSegment mirrors struct kvm_segment.
type KVMSegment struct {
	Base                         uint64
	Limit                        uint32
	Selector                     uint16
	Type, Present, DPL, DB, S, L uint8
	G, AVL, Unusable, Padding    uint8
}

// KVMDTable mirrors struct kvm_dtable.
type KVMDTable struct {
	Base    uint64
	Limit   uint16
	Padding [3]uint16
}

// KVMSregs mirrors struct kvm_sregs.
type KVMSregs struct {
	CS, DS, ES, FS, GS, SS, TR, LDT KVMSegment
	GDT, IDT                        KVMDTable
	CR0, CR2, CR3, CR4, CR8         uint64
	EFER, APICBase                  uint64
	InterruptBitmap                 [4]uint64
}

// SyncRegs is the register state KVM stores in the kvm_run page when
// kvm_valid_regs asks for it (struct kvm_sync_regs without the events).
type SyncRegs struct {
	Regs  KVMRegs
	Sregs KVMSregs
}
