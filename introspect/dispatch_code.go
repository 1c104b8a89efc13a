package introspect

import (
	"bytes"
	"strings"

	"golang.org/x/arch/x86/x86asm"
)

// Decoding the dispatch functions' code, for their call targets and for
// telling which instructions changed between two readings.

// insn is one instruction of a function, decoded.
type insn struct {
	off, len int
	op       x86asm.Op // 0 when the bytes did not decode
	branch   bool      // a direct (relative) call or jump
	target   uint64    // its target, when branch
}

// endbr64 is IBT's landing pad, which x86asm does not know; without it
// its four bytes would decode as a prefix and a hint NOP.
var endbr64 = []byte{0xf3, 0x0f, 0x1e, 0xfa}

// decodeCode decodes code, which starts at addr, linearly from its start.
// Bytes that do not decode (data, padding, a half-written patch) count as
// one-byte instructions, so decoding ends and resynchronises: the same
// bytes always decode the same way, whatever precedes them by more than
// an instruction.
func decodeCode(code []byte, addr uint64) []insn {
	out := make([]insn, 0, len(code)/4+1)
	for off := 0; off < len(code); {
		i := decodeOne(code[off:], addr+uint64(off))
		i.off = off
		out = append(out, i)
		off += i.len
	}
	return out
}

// decodeOne decodes the instruction at the start of b, at address pc. It
// always consumes at least one byte, and never more than len(b).
func decodeOne(b []byte, pc uint64) (i insn) {
	i.len = 1
	if bytes.HasPrefix(b, endbr64) {
		i.len = len(endbr64)
		return i
	}
	defer func() {
		// x86asm is not meant for hostile input; a panic in it is one
		// undecodable byte here.
		if recover() != nil {
			i = insn{len: 1}
		}
	}()
	in, err := x86asm.Decode(b, 64)
	if err != nil || in.Op == 0 || in.Len <= 0 || in.Len > len(b) {
		return i
	}
	i.len, i.op = in.Len, in.Op
	if rel, ok := in.Args[0].(x86asm.Rel); ok && isBranch(in.Op) {
		i.branch = true
		i.target = pc + uint64(in.Len) + uint64(int64(rel))
	}
	return i
}

// isBranch reports whether op is a call or jump (with a Rel argument, a
// direct one).
func isBranch(op x86asm.Op) bool {
	switch op {
	case x86asm.CALL, x86asm.JMP, x86asm.JA, x86asm.JAE, x86asm.JB, x86asm.JBE, x86asm.JCXZ, x86asm.JE,
		x86asm.JECXZ, x86asm.JG, x86asm.JGE, x86asm.JL, x86asm.JLE, x86asm.JNE, x86asm.JNO, x86asm.JNP,
		x86asm.JNS, x86asm.JO, x86asm.JP, x86asm.JRCXZ, x86asm.JS:
		return true
	}
	return false
}

// callSites returns the direct calls in code, and the direct jumps that
// leave it (tail calls: x64_sys_call ends its cases with jmp
// __x64_sys_*). Jumps within the function are its own control flow.
func callSites(code []byte, addr uint64) []CallSite {
	out := []CallSite{}
	end := addr + uint64(len(code))
	for _, i := range decodeCode(code, addr) {
		if !i.branch || i.op != x86asm.CALL && i.target >= addr && i.target < end {
			continue
		}
		out = append(out, CallSite{Offset: uint64(i.off), Target: i.target, Insn: strings.ToLower(i.op.String())})
	}
	return out
}

// codeDiff is a byte range [lo, hi) of a function that differs between two
// readings, and the instructions each reading has there.
type codeDiff struct {
	lo, hi    int
	base, cur []insn
}

// codeDiffs compares two readings of a function at addr. It splits
// both at the instruction boundaries their decodings share and returns
// the pieces whose bytes differ: a patched 5-byte site that kept the
// boundaries around it is one piece of one instruction each side, and a
// patch that straddles instructions is one piece covering them all. Past
// the shorter reading, the rest of the longer one is one piece.
func codeDiffs(base, cur []byte, addr uint64) []codeDiff {
	n := min(len(base), len(cur))
	bi, ci := decodeCode(base[:n], addr), decodeCode(cur[:n], addr)
	var out []codeDiff
	lo, i, j := 0, 0, 0
	for lo < n {
		// Both decodings start an instruction at lo. Take one from each,
		// then more from whichever is behind, until they end together.
		// Each covers [0, n) without gaps, so neither runs out first.
		i0, j0 := i, j
		bEnd, cEnd := lo, lo
		for bEnd == lo || cEnd == lo || bEnd != cEnd {
			if bEnd <= cEnd {
				bEnd = bi[i].off + bi[i].len
				i++
			} else {
				cEnd = ci[j].off + ci[j].len
				j++
			}
		}
		if !bytes.Equal(base[lo:bEnd], cur[lo:bEnd]) {
			out = append(out, codeDiff{lo: lo, hi: bEnd, base: bi[i0:i], cur: ci[j0:j]})
		}
		lo = bEnd
	}
	if len(base) != len(cur) {
		out = append(out, codeDiff{lo: n, hi: max(len(base), len(cur))})
	}
	return out
}

// allNOP reports whether ins are NOPs only.
func allNOP(ins []insn) bool {
	for _, i := range ins {
		if i.op != x86asm.NOP {
			return false
		}
	}
	return len(ins) > 0
}

// oneBranch returns the single direct call or jmp that ins consist of.
func oneBranch(ins []insn) (insn, bool) {
	if len(ins) != 1 || !ins[0].branch || ins[0].op != x86asm.CALL && ins[0].op != x86asm.JMP {
		return insn{}, false
	}
	return ins[0], true
}
