//go:build linux && amd64

package guestmem

import (
	"context"
	"fmt"
	"sort"
	"sync/atomic"
	"time"

	"github.com/kvmscope/kvmscope/tracer"
)

// Live is the memory and vCPUs of a running QEMU/KVM guest captured by the
// tracer: memory is read from QEMU's process through the memslot table,
// registers come from the vCPUs' kvm_run pages. Like the tracer it is
// built for linux/amd64 only; the other sources build for any Linux.
type Live struct {
	vm    VM
	write bool
	memfd memfdRAM // read-only mappings of memfd-backed guest RAM (memfd.go)

	// ranges caches slots() for one memslot generation: a scan makes
	// thousands of small reads, and the table rarely changes after boot.
	ranges atomic.Pointer[liveRanges]
}

type liveRanges struct {
	gen    uint64
	ranges []procRange
}

// VM is the tracer's hold on a KVM guest, as Live reads it: *tracer.VM in
// the tracer's own process, or a handoff.Client in the analysis process,
// which asks the tracer's process (tracer/handoff).
type VM interface {
	// Pid is the QEMU process, 0 before it created its KVM VM.
	Pid() int
	Memslots() []tracer.Memslot
	// MemslotGen changes at least whenever Memslots does.
	MemslotGen() uint64
	VCPUs() []tracer.VCPUInfo
	Registers(ctx context.Context, id int) (tracer.Sample, error)
	MSRs(id int) (map[uint32]uint64, time.Time)
	ReadMSRs(ctx context.Context, id int, indices []uint32) (map[uint32]uint64, error)
	Guarded(gpa, size uint64) bool
	WriteGuarded(ctx context.Context, gpa uint64, b []byte) error
	// SetRegisters changes a vCPU's general registers while QEMU is
	// paused (tracer.VM.SetRegisters).
	SetRegisters(id int, change func(*tracer.KVMRegs)) (old, new tracer.KVMRegs, err error)
	// SetMSRs writes MSRs of a vCPU, with QEMU frozen for the write
	// (tracer.VM.SetMSRs).
	SetMSRs(ctx context.Context, id int, set map[uint32]uint64) (old, new map[uint32]uint64, err error)
}

// NewLive returns the live source for vm. Writes are refused unless
// allowWrite is set.
func NewLive(vm VM, allowWrite bool) *Live { return &Live{vm: vm, write: allowWrite} }

// slots returns the memslots of address space 0 (address space 1 is SMM
// memory, which the guest OS does not see) as QEMU process ranges.
func (l *Live) slots() []procRange {
	gen := l.vm.MemslotGen()
	if c := l.ranges.Load(); c != nil && c.gen == gen {
		return c.ranges
	}
	ms := l.vm.Memslots()
	out := make([]procRange, 0, len(ms))
	for _, m := range ms {
		if m.AddressSpace() != 0 || m.GuestMemfd {
			continue
		}
		out = append(out, procRange{GPA: m.GPA, Size: m.Size, HVA: m.HVA, ReadOnly: m.ReadOnly})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].GPA < out[j].GPA })
	// gen was read before the table: if it changed since, the next call
	// sees a newer gen and rebuilds.
	l.ranges.Store(&liveRanges{gen: gen, ranges: out})
	return out
}

// Regions lists guest RAM and ROM as KVM maps it.
func (l *Live) Regions() []Region { return rangesToRegions(l.slots()) }

// ReadAt reads guest physical memory: by copying from our read-only
// mapping where guest RAM is a memfd, else with process_vm_readv.
func (l *Live) ReadAt(p []byte, gpa int64) (int, error) {
	return l.memfd.readAt(l.vm.Pid(), l.slots(), p, gpa)
}

// ReadBatch does many small reads in few system calls (see BatchReader).
// Where guest RAM is a memfd mapping, reads are plain copies.
func (l *Live) ReadBatch(reqs []PhysReq) {
	l.memfd.readBatch(l.vm.Pid(), l.slots(), reqs)
}

// WriteAt writes guest physical memory (only with allowWrite).
func (l *Live) WriteAt(p []byte, gpa int64) (int, error) {
	if !l.write {
		return 0, ErrReadOnly
	}
	if gpa >= 0 && l.vm.Guarded(uint64(gpa), uint64(len(p))) {
		// QEMU's mapping of a guarded page is read-only (tracer/guard.go):
		// the tracer writes past it.
		if err := l.vm.WriteGuarded(context.Background(), uint64(gpa), p); err != nil {
			return 0, fmt.Errorf("guest physical %#x (guarded): %w", gpa, err)
		}
		return len(p), nil
	}
	return ioRanges(l.vm.Pid(), l.slots(), p, gpa, true)
}

// CPUs returns fresh registers of every captured vCPU.
func (l *Live) CPUs(ctx context.Context) ([]CPU, error) {
	var out []CPU
	for _, v := range l.vm.VCPUs() {
		s, err := l.vm.Registers(ctx, v.ID)
		if err != nil {
			return nil, fmt.Errorf("registers of vCPU %d: %w", v.ID, err)
		}
		c := cpuFromKVM(v.ID, s.Regs)
		if m, at := l.vm.MSRs(v.ID); !at.IsZero() {
			if lstar, ok := m[MSRLSTAR]; ok {
				c.Entry = &EntryMSRs{LSTAR: lstar, CSTAR: m[MSRCSTAR], SysenterEIP: m[MSRSysenterEIP], At: at}
			}
			c.KernelGSBase = m[MSRKernelGSBase]
		}
		out = append(out, c)
	}
	return out, nil
}

// ReadEntryMSRs has KVM report every vCPU's system-call entry MSRs
// (KVM_GET_MSRS run as QEMU on each vCPU's thread: sync regs carry no
// MSRs); CPUs carries them from then on, as Entry, until QEMU or a later
// call reads newer ones.
func (l *Live) ReadEntryMSRs(ctx context.Context) error {
	for _, v := range l.vm.VCPUs() {
		if _, err := l.vm.ReadMSRs(ctx, v.ID, []uint32{MSRLSTAR, MSRCSTAR, MSRSysenterEIP, MSRKernelGSBase}); err != nil {
			return fmt.Errorf("MSRs of vCPU %d: %w", v.ID, err)
		}
	}
	return nil
}

// cpuFromKVM converts KVM's sync regs to a CPU.
func cpuFromKVM(id int, r tracer.SyncRegs) CPU {
	s := r.Sregs
	return CPU{
		ID: id, RIP: r.Regs.RIP, RSP: r.Regs.RSP, RFLAGS: r.Regs.RFLAGS,
		CR0: s.CR0, CR2: s.CR2, CR3: s.CR3, CR4: s.CR4, EFER: s.EFER,
		CSBase: s.CS.Base, DSBase: s.DS.Base, SSBase: s.SS.Base, FSBase: s.FS.Base, GSBase: s.GS.Base,
		CSL: s.CS.L != 0, CSDB: s.CS.DB != 0,
		IDTBase: s.IDT.Base, IDTLimit: s.IDT.Limit,
	}
}

// Writable reports whether WriteAt may change guest memory.
func (l *Live) Writable() bool { return l.write }

// MemfdRegions lists the guest physical ranges that ReadAt serves by copying
// from a read-only mapping of QEMU's memfd-backed guest RAM (Name is the
// memfd's name, e.g. "memfd:memory-backend-memfd"); every other range is
// read with process_vm_readv. The error says why memfd-backed RAM was found
// but could not be mapped (reads of it still work, through
// process_vm_readv).
func (l *Live) MemfdRegions() ([]Region, error) {
	pid := l.vm.Pid()
	if pid == 0 {
		return nil, nil
	}
	return l.memfd.regions(pid, l.slots())
}

// Close releases the mappings of QEMU's memfd-backed guest RAM. A mapping
// keeps its memfd (the whole guest RAM) alive after QEMU exits, so call Close
// when the VM is gone. The Live source stays usable: a later read maps again.
func (l *Live) Close() error {
	l.memfd.close()
	return nil
}
