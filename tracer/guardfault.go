//go:build linux && amd64

package tracer

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/kvmscope/kvmscope/internal/x86regs"
	"golang.org/x/arch/x86/x86asm"
	"golang.org/x/sys/unix"
)

// guardFault handles a SIGSEGV of QEMU thread tid at its delivery stop. If
// QEMU faulted storing into a guarded page (guard.go), it records the
// store, moves the thread past its store instruction and reports true: the
// caller suppresses the signal. Anything else is QEMU's own crash, left to
// happen as it would.
func (t *Tracer) guardFault(tid int) bool {
	if !t.guard.active() {
		return false
	}
	addr, err := faultAddr(tid)
	if err != nil {
		return false
	}
	gpa, ok := t.guard.guardedHVA(addr)
	if !ok {
		return false
	}
	pid := t.tgids[tid]
	var regs unix.PtraceRegs
	if err := unix.PtraceGetRegs(tid, &regs); err != nil {
		return false
	}
	w := BlockedWrite{At: time.Now(), GPA: gpa, VCPU: -1, TID: tid, HostRIP: regs.Rip}
	logged := t.vcpuStore(tid, &w)
	if !logged && w.Regs != nil && t.kernelPatch(w.Regs) {
		// The kernel's own text patching: the bytes land (written
		// here, past QEMU's read-only mapping), and QEMU's store is
		// skipped as for a blocked one.
		w.Landed, w.Reason = true, "the kernel's own text patching (text_poke: CR3 is poking_mm's)"
		if hva, ok := t.guard.hvaOf(w.GPA); !ok {
			w.Landed, w.Reason = false, "blocked: no host address for the kernel's text patch"
		} else if err := writeForced(pid, hva, w.Data); err != nil {
			w.Landed, w.Reason = false, "blocked: the kernel's text patch could not be written: "+err.Error()
		}
	}

	inst, f, err := hostInsn(pid, &regs)
	var st x86regs.Store
	if err == nil {
		var ok bool
		if st, ok = f.StoreOf(inst); !ok {
			err = fmt.Errorf("QEMU's instruction %v at %#x is not a plain store", inst, regs.Rip)
		}
	}
	if err != nil {
		// Crashing QEMU is worse than a landed store: let this one
		// through, with the guard off for the thread's one instruction.
		w.Landed, w.Reason = true, err.Error()
		t.guardLetThrough(tid, addr)
		t.guardReport(w, logged)
		return true
	}
	if w.VCPU < 0 && st.Known {
		w.Data = binary.LittleEndian.AppendUint64(nil, st.Value)[:st.Size]
	}
	skipStore(&regs, inst, st)
	t.skipFollowingStores(pid, &regs)
	if err := unix.PtraceSetRegs(tid, &regs); err != nil {
		return false
	}
	t.guardReport(w, logged)
	return true
}

// guardReport counts and reports w, once per guest store: QEMU's memmove
// of one MMIO exit may fault more than once (already logged).
func (t *Tracer) guardReport(w BlockedWrite, logged bool) {
	if logged {
		return
	}
	t.guard.mu.Lock()
	if w.Landed {
		t.guard.allowed++
	} else {
		t.guard.blocked++
	}
	report := t.guard.report
	t.guard.mu.Unlock()
	if report != nil {
		report(w)
	} else {
		t.log.Warn().Uint64("gpa", w.GPA).Int("vcpu", w.VCPU).Hex("data", w.Data).Msg("guard: blocked a write")
	}
}

// kernelPatch reports whether a vCPU with regs stores as the guest
// kernel's text patching does: in ring 0 with poking_mm's CR3 loaded.
func (t *Tracer) kernelPatch(regs *SyncRegs) bool {
	t.guard.mu.Lock()
	patch := t.guard.opts.PatchCR3
	t.guard.mu.Unlock()
	return patch != 0 && regs.Sregs.CS.Selector&3 == 0 && cr3Root(regs.Sregs.CR3) == cr3Root(patch)
}

// vcpuStore fills w from kvm_run when tid is a vCPU thread handling the
// MMIO exit of a guest store into a guarded page: the exit holds the
// guest-physical address and the bytes. It reports whether that exit was
// already recorded (a second fault of the same memmove); the first fault
// marks the exit by zeroing mmio.len in the shared page, which nothing
// reads after QEMU took its copy (KVM copies data back only for reads).
func (t *Tracer) vcpuStore(tid int, w *BlockedWrite) (logged bool) {
	v := t.vm
	v.mu.Lock()
	c := v.byTID[tid]
	v.mu.Unlock()
	if c == nil {
		return false
	}
	mem := c.run.mem
	le := binary.LittleEndian
	if le.Uint32(mem[KVMRunExitReasonOffset:]) != kvmExitMMIO {
		return false
	}
	mmio := mem[kvmRunMMIOOffset:]
	phys, n, write := le.Uint64(mmio[0:]), le.Uint32(mmio[16:]), mmio[20] != 0
	if !write || !t.guard.guardedGPA(phys) {
		return false
	}
	if n == 0 {
		return true
	}
	w.VCPU, w.GPA = c.ID, phys
	w.Data = append([]byte(nil), mmio[8:8+min(n, 8)]...)
	regs := c.run.syncRegs()
	w.Regs = &regs
	le.PutUint32(mmio[16:], 0)
	return false
}

// hostInsn decodes QEMU's instruction at regs.Rip.
func hostInsn(pid int, regs *unix.PtraceRegs) (x86asm.Inst, *x86regs.File, error) {
	code := make([]byte, 15)
	n := len(code)
	for ; n > 0; n-- {
		// The instruction may end just before an unmapped page.
		if readTask(pid, regs.Rip, code[:n]) == nil {
			break
		}
	}
	if n == 0 {
		return x86asm.Inst{}, nil, fmt.Errorf("QEMU's code at %#x is unreadable", regs.Rip)
	}
	inst, err := x86asm.Decode(code[:n], 64)
	if err != nil {
		return x86asm.Inst{}, nil, fmt.Errorf("decode QEMU's instruction at %#x: %w", regs.Rip, err)
	}
	f := &x86regs.File{regs.Rax, regs.Rcx, regs.Rdx, regs.Rbx, regs.Rsp, regs.Rbp, regs.Rsi, regs.Rdi,
		regs.R8, regs.R9, regs.R10, regs.R11, regs.R12, regs.R13, regs.R14, regs.R15, regs.Rip}
	return inst, f, nil
}

// skipFollowingStores skips, after a skipped store, the plain stores that
// follow it into guarded pages too: QEMU's memmove of an MMIO write of 8
// bytes is two overlapping 8-byte stores, and each would fault again (a
// ptrace stop each). It stops at the first instruction that is not such
// a store, and after a few.
func (t *Tracer) skipFollowingStores(pid int, regs *unix.PtraceRegs) {
	for i := 0; i < 4; i++ {
		inst, f, err := hostInsn(pid, regs)
		if err != nil {
			return
		}
		st, ok := f.StoreOf(inst)
		if !ok || st.String {
			return
		}
		a, ok := f.Addr(inst, st.Mem)
		if !ok {
			return
		}
		if _, ok := t.guard.guardedHVA(a); !ok {
			return
		}
		regs.Rip += uint64(inst.Len)
	}
}

// skipStore moves regs past store inst as if it had completed without
// writing: RIP after it, and for a string store RDI (and RSI for MOVS)
// advanced over every element and RCX spent.
func skipStore(regs *unix.PtraceRegs, inst x86asm.Inst, st x86regs.Store) {
	regs.Rip += uint64(inst.Len)
	if !st.String {
		return
	}
	count := uint64(1)
	if st.Rep {
		count, regs.Rcx = regs.Rcx, 0
	}
	delta := count * uint64(st.Size)
	if regs.Eflags&(1<<10) != 0 { // DF: the string goes down
		delta = -delta
	}
	regs.Rdi += delta
	if inst.Op == x86asm.MOVSB || inst.Op == x86asm.MOVSW || inst.Op == x86asm.MOVSD || inst.Op == x86asm.MOVSQ {
		regs.Rsi += delta
	}
}

// guardLetThrough lets QEMU's faulting store at addr happen: the page is
// made writable for one single-stepped instruction of tid, with QEMU
// frozen, then read-only again.
func (t *Tracer) guardLetThrough(tid int, addr uint64) {
	pid := t.tgids[tid]
	if err := t.freeze(tid, pid); err != nil {
		t.log.Error().Err(err).Msg("guard: freeze QEMU")
	}
	defer t.thaw(tid)
	run := t.runOn(tid)
	page := addr &^ 0xfff
	if _, err := run(Syscall{NR: unix.SYS_MPROTECT, Args: [6]uint64{page, 4096, protRW}}); err != nil {
		t.log.Error().Err(err).Msg("guard: unprotect a page for QEMU")
		return
	}
	if err := ptrace(unix.PTRACE_SINGLESTEP, tid, 0, 0); err == nil {
		var ws unix.WaitStatus
		for {
			if _, err := unix.Wait4(tid, &ws, unix.WALL, nil); err != unix.EINTR {
				break
			}
		}
	}
	if _, err := run(Syscall{NR: unix.SYS_MPROTECT, Args: [6]uint64{page, 4096, unix.PROT_READ}}); err != nil {
		t.log.Error().Err(err).Msg("guard: protect a page again")
	}
}

// faultAddr is si_addr of the signal tid is stopped for.
func faultAddr(tid int) (uint64, error) {
	var si [128]byte
	if err := ptraceBuf(unix.PTRACE_GETSIGINFO, tid, si[:]); err != nil {
		return 0, err
	}
	// struct siginfo: si_signo, si_errno, si_code (ints), padding, then
	// the union, whose first member for SIGSEGV is si_addr.
	return binary.LittleEndian.Uint64(si[16:]), nil
}
