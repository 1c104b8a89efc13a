// Package x86regs gives the values of the registers an x86-64 instruction
// decoded by golang.org/x/arch/x86/x86asm names, from a plain register
// file: the tracer uses it on QEMU's registers (ptrace) and guestmem on a
// guest vCPU's (kvm_run sync regs).
package x86regs

import "golang.org/x/arch/x86/x86asm"

// File holds the general registers in their encoding order (RAX, RCX, RDX,
// RBX, RSP, RBP, RSI, RDI, R8..R15), then RIP.
type File [17]uint64

// RIP indexes the instruction pointer in File.
const RIP = 16

// Value returns the value of register r and its size in bytes: the low
// bytes of a 64-bit register for its 32/16/8-bit names (AH..BH are bits
// 8-15 of RAX..RBX). ok is false for registers File does not hold
// (segment, vector, control).
func (f *File) Value(r x86asm.Reg) (v uint64, size int, ok bool) {
	switch {
	case r >= x86asm.RAX && r <= x86asm.R15:
		return f[r-x86asm.RAX], 8, true
	case r >= x86asm.EAX && r <= x86asm.R15L:
		return f[r-x86asm.EAX] & 0xffffffff, 4, true
	case r >= x86asm.AX && r <= x86asm.R15W:
		return f[r-x86asm.AX] & 0xffff, 2, true
	case r >= x86asm.AL && r <= x86asm.BL:
		return f[r-x86asm.AL] & 0xff, 1, true
	case r >= x86asm.AH && r <= x86asm.BH:
		return f[r-x86asm.AH] >> 8 & 0xff, 1, true
	case r >= x86asm.SPB && r <= x86asm.R15B:
		return f[r-x86asm.SPB+4] & 0xff, 1, true
	case r == x86asm.RIP:
		return f[RIP], 8, true
	}
	return 0, 0, false
}

// Addr computes the effective address of memory operand m of inst, which
// starts at f[RIP] (RIP-relative operands count from its end). Segment
// overrides other than FS and GS have no base in 64-bit mode; FS and GS
// bases are not in File, so such operands are not computed (ok false).
func (f *File) Addr(inst x86asm.Inst, m x86asm.Mem) (uint64, bool) {
	if m.Segment == x86asm.FS || m.Segment == x86asm.GS {
		return 0, false
	}
	a := uint64(m.Disp)
	if m.Base != 0 {
		v, _, ok := f.Value(m.Base)
		if !ok {
			return 0, false
		}
		if m.Base == x86asm.RIP {
			v += uint64(inst.Len)
		}
		a += v
	}
	if m.Index != 0 {
		v, _, ok := f.Value(m.Index)
		if !ok {
			return 0, false
		}
		a += v * uint64(m.Scale)
	}
	if inst.AddrSize == 32 {
		a &= 0xffffffff
	}
	return a, true
}

// Store describes what a store instruction writes: the memory operand,
// and for a plain register or immediate store the value and its size.
type Store struct {
	Mem   x86asm.Mem
	Value uint64
	Size  int
	Known bool // Value holds the stored bytes (little-endian, Size bytes)
	// String is set for MOVS/STOS: they write at RDI, RCX times with a
	// REP prefix, Size bytes each.
	String, Rep bool
}

// StoreOf returns what inst stores, if it is an instruction whose only
// effect beyond memory is on RIP (plain moves to memory) or a string
// store; ok is false for anything else.
func (f *File) StoreOf(inst x86asm.Inst) (s Store, ok bool) {
	switch inst.Op {
	case x86asm.MOVSB, x86asm.STOSB:
		s.Size = 1
	case x86asm.MOVSW, x86asm.STOSW:
		s.Size = 2
	case x86asm.MOVSD, x86asm.STOSD:
		s.Size = 4
	case x86asm.MOVSQ, x86asm.STOSQ:
		s.Size = 8
	}
	if s.Size != 0 {
		s.String = true
		for _, p := range inst.Prefix {
			if p&0xff == 0xf3 || p&0xff == 0xf2 {
				s.Rep = true
			}
		}
		return s, true
	}
	if !plainStores[inst.Op] {
		return Store{}, false
	}
	m, isMem := inst.Args[0].(x86asm.Mem)
	if !isMem {
		return Store{}, false
	}
	s.Mem, s.Size = m, inst.MemBytes
	switch src := inst.Args[1].(type) {
	case x86asm.Reg:
		if v, n, ok := f.Value(src); ok && n == s.Size {
			s.Value, s.Known = v, true
		}
	case x86asm.Imm:
		s.Value, s.Known = uint64(src), true
		if s.Size < 8 {
			s.Value &= 1<<(8*s.Size) - 1
		}
	}
	return s, true
}

// plainStores are the instructions that, with a memory first operand,
// only write it: skipping one changes nothing but memory.
var plainStores = map[x86asm.Op]bool{
	x86asm.MOV: true, x86asm.MOVNTI: true, x86asm.MOVD: true, x86asm.MOVQ: true,
	x86asm.MOVUPS: true, x86asm.MOVAPS: true, x86asm.MOVUPD: true, x86asm.MOVAPD: true,
	x86asm.MOVDQU: true, x86asm.MOVDQA: true, x86asm.MOVNTDQ: true, x86asm.MOVNTPS: true,
	x86asm.MOVLPS: true, x86asm.MOVHPS: true, x86asm.MOVLPD: true, x86asm.MOVHPD: true,
	x86asm.MOVSS: true, x86asm.MOVSD_XMM: true,
	x86asm.VMOVDQU: true, x86asm.VMOVDQA: true, x86asm.VMOVUPS: true, x86asm.VMOVAPS: true,
	x86asm.VMOVNTDQ: true,
}
