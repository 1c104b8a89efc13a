package introspect

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"strings"

	"golang.org/x/arch/x86/x86asm"
)

// Judging a Dispatch: alone (Judge) or against a baseline (Compare). The
// rules are in dispatch.go's comment.

// A Deviation is one thing in the dispatch that is not what it should be.
type Deviation struct {
	// What is the location: "sys_call_table[62]", "x64_sys_call+0x1a3",
	// "idt[14]".
	What string `json:"what"`
	// Kind is "table", "code", "call_target", "idt", or "runtime_patch"
	// for the kernel's own text patching (jump labels, static calls,
	// ftrace), which is not tampering.
	Kind string `json:"kind"`
	// Current is a hex address (entries, targets, handlers) or hex bytes
	// (code).
	Current string `json:"current"`
	// CurrentSymbol is "__x64_sys_kill+0x0" for core kernel text,
	// "name [module]" for a module, "" when the target is in no kernel
	// text.
	CurrentSymbol  string `json:"current_symbol"`
	Baseline       string `json:"baseline,omitempty"`
	BaselineSymbol string `json:"baseline_symbol,omitempty"`
	Detail         string `json:"detail,omitempty"`
}

// Judge judges d with no baseline (a dump, or the first scan) by what the
// kernel itself says: every table entry must be a system-call function
// in core kernel text, every call target inside x64_sys_call & co. must
// be one too (or a compiler helper such as a return thunk), every other
// call target and every present IDT handler must be in core kernel text.
// A target inside a module or outside all text is a deviation; a
// function traced by ftrace is reported as a runtime_patch.
func (k *Kernel) Judge(d *Dispatch) []Deviation {
	out := []Deviation{}
	if d == nil {
		return out
	}
	r := newResolver(k, d)
	for _, t := range d.Tables {
		for i, e := range t.Entries[:min(len(t.Entries), maxTableEntries)] {
			if r.isSyscall(e) {
				continue
			}
			out = append(out, r.addrDeviation(fmt.Sprintf("%s[%d]", t.Name, i), "table", e, "not a system-call function in core kernel text"))
		}
	}
	for _, f := range d.Functions {
		for _, c := range f.Calls[:min(len(f.Calls), maxFunctionSize)] {
			what := fmt.Sprintf("%s+%#x", f.Name, c.Offset)
			switch {
			case r.isFtrace(c.Target) && c.Target != r.fentry:
				dev := r.addrDeviation(what, "runtime_patch", c.Target, "traced by ftrace (a tracer, or an ftrace-based hook)")
				out = append(out, dev)
			case !r.inText(c.Target):
				out = append(out, r.addrDeviation(what, "call_target", c.Target, c.Insn+" target outside core kernel text"))
			case dispatchers[f.Name] && !r.isSyscall(c.Target) && !r.isHelper(c.Target):
				out = append(out, r.addrDeviation(what, "call_target", c.Target, c.Insn+" target is not a system-call function"))
			}
		}
	}
	for _, g := range d.IDT {
		if g.Present && !r.inText(g.Handler) && !r.earlyIDTHandler(g.Vector, g.Handler) {
			out = append(out, r.addrDeviation(fmt.Sprintf("idt[%d]", g.Vector), "idt", g.Handler, "handler outside core kernel text"))
		}
	}
	return out
}

// Compare judges cur against a baseline taken earlier from the same
// kernel (same KASLR): every changed table entry, IDT handler, and every
// changed instruction of a function (a changed call target named by its
// call site). k names the addresses; it may be nil.
func Compare(baseline, cur *Dispatch, k *Kernel) []Deviation {
	out := []Deviation{}
	if baseline == nil || cur == nil {
		return out
	}
	r := newResolver(k, cur)
	out = append(out, compareTables(r, baseline.Tables, cur.Tables)...)
	out = append(out, compareFunctions(r, baseline.Functions, cur.Functions)...)
	bIDT := map[int]Gate{}
	for _, g := range baseline.IDT {
		bIDT[g.Vector] = g
	}
	for _, g := range cur.IDT {
		b, ok := bIDT[g.Vector]
		if !ok || b == g {
			continue
		}
		dev := r.addrDeviation(fmt.Sprintf("idt[%d]", g.Vector), "idt", g.Handler, "")
		dev.Baseline, dev.BaselineSymbol = fmt.Sprintf("%#x", b.Handler), r.symbol(b.Handler)
		if b.Present != g.Present {
			dev.Detail = fmt.Sprintf("present %v, was %v", g.Present, b.Present)
		}
		out = append(out, dev)
	}
	return out
}

// pairByName matches two readings by name. A pair at the same address
// goes to each; a reading only in cur, one that moved (another kernel),
// and one only in the baseline are deviations of kind. Deviations keep
// cur's order, then the baseline's.
func pairByName[T any](baseline, cur []T, name func(T) string, addr func(T) uint64, kind, what string, each func(b, c T) []Deviation) []Deviation {
	var out []Deviation
	byName := map[string]T{}
	for _, b := range baseline {
		byName[name(b)] = b
	}
	seen := map[string]bool{}
	for _, c := range cur {
		seen[name(c)] = true
		b, ok := byName[name(c)]
		switch {
		case !ok:
			out = append(out, Deviation{What: name(c), Kind: kind, Current: fmt.Sprintf("%#x", addr(c)), Detail: "not in the baseline"})
		case addr(b) != addr(c):
			out = append(out, Deviation{What: name(c), Kind: kind, Current: fmt.Sprintf("%#x", addr(c)), Baseline: fmt.Sprintf("%#x", addr(b)), Detail: "the " + what + " moved: not the baseline's kernel"})
		default:
			out = append(out, each(b, c)...)
		}
	}
	for _, b := range baseline {
		if !seen[name(b)] {
			out = append(out, Deviation{What: name(b), Kind: kind, Baseline: fmt.Sprintf("%#x", addr(b)), Detail: "in the baseline, not read now"})
		}
	}
	return out
}

func compareTables(r *resolver, baseline, cur []SyscallTable) []Deviation {
	return pairByName(baseline, cur, func(t SyscallTable) string { return t.Name }, func(t SyscallTable) uint64 { return t.Addr }, "table", "table",
		func(b, c SyscallTable) []Deviation {
			var out []Deviation
			// An entry past one reading's end is 0 there (trailing
			// zeros are dropped as padding).
			n := min(max(len(b.Entries), len(c.Entries)), maxTableEntries)
			for i := range n {
				bv, cv := entry(b.Entries, i), entry(c.Entries, i)
				if bv == cv {
					continue
				}
				dev := r.addrDeviation(fmt.Sprintf("%s[%d]", c.Name, i), "table", cv, "")
				dev.Baseline, dev.BaselineSymbol = fmt.Sprintf("%#x", bv), r.symbol(bv)
				out = append(out, dev)
			}
			return out
		})
}

func entry(e []uint64, i int) uint64 {
	if i < len(e) {
		return e[i]
	}
	return 0
}

func compareFunctions(r *resolver, baseline, cur []FunctionCode) []Deviation {
	return pairByName(baseline, cur, func(f FunctionCode) string { return f.Name }, func(f FunctionCode) uint64 { return f.Addr }, "code", "function",
		func(b, c FunctionCode) []Deviation {
			var out []Deviation
			bc, cc := b.Code[:min(len(b.Code), maxFunctionSize)], c.Code[:min(len(c.Code), maxFunctionSize)]
			if bytes.Equal(bc, cc) {
				return nil
			}
			for _, d := range codeDiffs(bc, cc, c.Addr) {
				out = append(out, r.classify(c.Name, d, bc, cc))
			}
			return out
		})
}

// classify turns one changed piece of function fn into a Deviation.
func (r *resolver) classify(fn string, d codeDiff, base, cur []byte) Deviation {
	dev := Deviation{What: fmt.Sprintf("%s+%#x", fn, d.lo), Kind: "code",
		Current: hexBytes(cur, d.lo, d.hi), Baseline: hexBytes(base, d.lo, d.hi)}
	bb, bok := oneBranch(d.base)
	cb, cok := oneBranch(d.cur)
	n := d.hi - d.lo
	switch {
	case (n == 2 || n == 5) && allNOP(d.base) && cok && r.patchTarget(cb.target):
		dev.Kind, dev.CurrentSymbol = "runtime_patch", r.symbol(cb.target)
		dev.Detail = "NOP → " + patchKind(r, cb)
	case (n == 2 || n == 5) && allNOP(d.cur) && bok && r.patchTarget(bb.target):
		dev.Kind, dev.BaselineSymbol = "runtime_patch", r.symbol(bb.target)
		dev.Detail = patchKind(r, bb) + " → NOP"
	case bok && cok && r.isFtrace(bb.target) && r.isFtrace(cb.target):
		dev.Kind = "runtime_patch"
		dev.CurrentSymbol, dev.BaselineSymbol = r.symbol(cb.target), r.symbol(bb.target)
		dev.Detail = "ftrace: the traced function's call moved to another ftrace caller"
	case bok && cok && bb.len == n && cb.len == n:
		dev.Kind = "call_target"
		dev.Current, dev.CurrentSymbol = fmt.Sprintf("%#x", cb.target), r.symbol(cb.target)
		dev.Baseline, dev.BaselineSymbol = fmt.Sprintf("%#x", bb.target), r.symbol(bb.target)
		dev.Detail = r.where(cb.target)
		if bb.op != cb.op {
			dev.Detail = fmt.Sprintf("%s → %s; %s", mnemonic(bb.op), mnemonic(cb.op), dev.Detail)
		}
	default:
		// Name where branches in the new bytes lead: an inline hook is a
		// jmp or call out of the function.
		if t, ok := firstBranch(d.cur); ok {
			dev.CurrentSymbol = r.symbol(t.target)
			dev.Detail = fmt.Sprintf("now %s %#x (%s)", mnemonic(t.op), t.target, r.where(t.target))
		}
		if t, ok := firstBranch(d.base); ok {
			dev.BaselineSymbol = r.symbol(t.target)
		}
	}
	return dev
}

// patchKind names the branch a runtime patch installed or removed.
func patchKind(r *resolver, b insn) string {
	switch {
	case r.isFtrace(b.target):
		return "call " + r.symbol(b.target) + " (ftrace)"
	case b.op == x86asm.JMP:
		return "jmp " + r.symbol(b.target) + " (jump label)"
	default:
		return "call " + r.symbol(b.target) + " (static call)"
	}
}

func firstBranch(ins []insn) (insn, bool) {
	for _, i := range ins {
		if i.branch {
			return i, true
		}
	}
	return insn{}, false
}

func mnemonic(op x86asm.Op) string { return strings.ToLower(op.String()) }

// hexBytes is b[lo:hi] in hex, at most 64 bytes of it.
func hexBytes(b []byte, lo, hi int) string {
	lo, hi = min(lo, len(b)), min(hi, len(b))
	if hi-lo > 64 {
		return hex.EncodeToString(b[lo:lo+64]) + fmt.Sprintf("… (%d bytes)", hi-lo)
	}
	return hex.EncodeToString(b[lo:hi])
}
