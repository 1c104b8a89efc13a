package introspect

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
)

// The guest's system-call dispatch, read and judged from outside.
//
// What the kernel dispatches through depends on its version. Before 6.9
// (and the backports to 6.1.85, 6.6.26, 6.8.5) do_syscall_64 calls
// sys_call_table[nr]; since then it calls x64_sys_call(regs, nr), a switch
// the compiler turns into direct calls or tail jumps to __x64_sys_*
// (commit 1e3ad78334a6), and sys_call_table is kept for tracing only.
// Rootkits patch table entries on the old kernels and the call targets in
// x64_sys_call on the new ones; both are read here, with the entry code
// in front of them and the IDT beside them:
//
//   - ReadDispatch reads the tables, the code of the dispatch functions
//     (bytes, SHA-256, and every direct call and tail jump decoded with
//     x86asm, so that a changed target has a name) and, given the IDTR
//     base of a vCPU, the IDT's gates. Kallsyms has no sizes: a table or
//     a function ends where the next symbol starts, capped.
//   - Judge needs no baseline (a dump, the first scan): it checks what
//     the kernel itself implies. Table entries and the call targets of
//     x64_sys_call & co. must be system-call functions at their start, in
//     core kernel text (_stext.._etext); every other call target and every
//     present IDT handler must be in core kernel text. A target in a module,
//     in the module area outside any listed module (a hidden one), or
//     outside all text is a deviation.
//   - Compare checks a later reading against a baseline of the same boot:
//     every changed table entry and IDT gate, and every changed
//     instruction of a function, by decoding both versions and comparing
//     them between the instruction boundaries they share.
//
// The kernel patches its own text while it runs: jump labels (NOP ↔ jmp),
// static calls, ftrace (the 5-byte call __fentry__ at a function's entry
// is a NOP5 once booted and becomes a call to ftrace_caller or to a
// trampoline when the function is traced), and alternatives (at boot,
// before any baseline). As LKRG does, Compare reports a changed 2- or
// 5-byte site that goes NOP ↔ direct jmp/call into core kernel text or
// into an ftrace trampoline as Kind "runtime_patch", not as tampering;
// anything else is "code" or "call_target". An ftrace trampoline lives
// in the module area, so it is told by its bytes: x86's
// create_trampoline copies ftrace_caller (or ftrace_regs_caller) up to
// its op-pointer load, so the trampoline starts with those same bytes.
//
// Guest memory is hostile: every read is bounded (maxTableEntries,
// maxFunctionSize, one IDT page), decoding never panics, and Judge and
// Compare accept any Dispatch, however forged (fuzz_dispatch_test.go).

// Bounds on what is read. Kallsyms has no sizes, so a table or a function
// ends at the next symbol; the caps bound it when that symbol is far off
// (or forged). The largest real table, x32's before 5.4, has 548 entries;
// x64_sys_call is a few KiB.
const (
	maxTableEntries = 1024
	maxFunctionSize = 64 << 10
	idtGates        = 256
	idtGateSize     = 16
)

// Dispatch is what the kernel dispatches system calls and interrupts
// through, read at one moment.
type Dispatch struct {
	// Tables are sys_call_table, ia32_sys_call_table and
	// x32_sys_call_table, those the kernel has.
	Tables []SyscallTable `json:"tables"`
	// Functions are the dispatch functions and the entry code, those the
	// kernel has (dispatchFunctions).
	Functions []FunctionCode `json:"functions"`
	// IDT is read only when ReadDispatch is given an IDT base.
	IDT []Gate `json:"idt,omitempty"`
	// TextStart and TextEnd bound core kernel text (_stext.._etext).
	TextStart uint64 `json:"text_start"`
	TextEnd   uint64 `json:"text_end"`
}

// SyscallTable is one system-call table: an array of function pointers.
type SyscallTable struct {
	Name    string   `json:"name"`
	Addr    uint64   `json:"addr"`
	Entries []uint64 `json:"entries"`
}

// FunctionCode is the code of one function as it is in memory now.
type FunctionCode struct {
	Name string `json:"name"`
	Addr uint64 `json:"addr"`
	// Size is the extent read: up to the next symbol, at most
	// maxFunctionSize.
	Size uint64 `json:"size"`
	// SHA256 is the hex SHA-256 of Code.
	SHA256 string `json:"sha256"`
	Code   []byte `json:"code"`
	// Calls are the direct calls, and the direct jumps (conditional or
	// not) that leave the function: its tail calls.
	Calls []CallSite `json:"calls"`
}

// CallSite is one direct branch in a function.
type CallSite struct {
	// Offset is the instruction's offset in the function.
	Offset uint64 `json:"offset"`
	Target uint64 `json:"target"`
	// Insn is the mnemonic: "call", "jmp", "je", ...
	Insn string `json:"insn"`
}

// Gate is one IDT entry.
type Gate struct {
	Vector  int    `json:"vector"`
	Handler uint64 `json:"handler"`
	Present bool   `json:"present"`
}

// syscallTables are the tables ReadDispatch reads when the kernel has them.
var syscallTables = []string{"sys_call_table", "ia32_sys_call_table", "x32_sys_call_table"}

// dispatchers are the functions that switch on the system-call number
// (6.9+ and backports): every call target in them must be a system call.
var dispatchers = map[string]bool{"x64_sys_call": true, "ia32_sys_call": true, "x32_sys_call": true}

// dispatchFunctions are read when the kernel has them: the dispatchers,
// the C entry points that call them (or index the table), and the entry
// code LSTAR, CSTAR and int 0x80 lead to, whose labels kallsyms lists as
// symbols of their own (entry_SYSCALL_64_after_hwframe holds the call to
// do_syscall_64).
var dispatchFunctions = []string{
	"x64_sys_call", "ia32_sys_call", "x32_sys_call",
	"do_syscall_64", "do_int80_emulation", "do_int80_syscall_32", "do_fast_syscall_32",
	"entry_SYSCALL_64", "entry_SYSCALL_64_safe_stack", "entry_SYSCALL_64_after_hwframe",
	"entry_SYSCALL_compat", "entry_SYSCALL_compat_safe_stack", "entry_SYSCALL_compat_after_hwframe",
	"entry_INT80_compat", "entry_SYSENTER_compat", "entry_SYSENTER_compat_after_hwframe",
}

// ReadDispatch reads the dispatch of k; idtBase is the IDTR base from a
// vCPU's sregs (0: skip the IDT).
func (k *Kernel) ReadDispatch(idtBase uint64) (*Dispatch, error) {
	if k.Syms == nil {
		return nil, fmt.Errorf("read dispatch: no kallsyms: %w", ErrNotFound)
	}
	start, end, ok := k.coreText()
	if !ok {
		return nil, fmt.Errorf("read dispatch: core kernel text (_stext.._etext): %w", ErrNotFound)
	}
	d := &Dispatch{Tables: []SyscallTable{}, Functions: []FunctionCode{}, TextStart: start, TextEnd: end}
	for _, name := range syscallTables {
		addr, ok := k.Symbol(name)
		if !ok {
			continue
		}
		t, err := k.readTable(name, addr)
		if err != nil {
			return nil, fmt.Errorf("read dispatch: %w", err)
		}
		d.Tables = append(d.Tables, t)
	}
	for _, name := range dispatchFunctions {
		addr, ok := k.Symbol(name)
		if !ok {
			continue
		}
		f, err := k.readFunction(name, addr)
		if err != nil {
			return nil, fmt.Errorf("read dispatch: %w", err)
		}
		d.Functions = append(d.Functions, f)
	}
	if idtBase != 0 {
		idt, err := k.readIDT(idtBase)
		if err != nil {
			return nil, fmt.Errorf("read dispatch: %w", err)
		}
		d.IDT = idt
	}
	return d, nil
}

// coreText returns _stext.._etext: the kernel's text, entry code
// included, without init text (freed after boot) or modules.
func (k *Kernel) coreText() (start, end uint64, ok bool) {
	start, ok1 := k.Symbol("_stext")
	if !ok1 {
		start, ok1 = k.Symbol("_text")
	}
	end, ok2 := k.Symbol("_etext")
	if !ok1 || !ok2 || end <= start {
		return 0, 0, false
	}
	return start, end, true
}

// extent is how far from addr the object there may reach: to the next
// symbol (kallsyms has no sizes), at most limit bytes.
func (k *Kernel) extent(addr, limit uint64) uint64 {
	next, ok := k.Syms.next(addr)
	if !ok || next-addr > limit {
		return limit
	}
	return next - addr
}

// readTable reads the system-call table name at addr. Past the last
// system call and before the next symbol there may be alignment padding
// (6.1's 451 entries are followed by 8 zero bytes): every real slot holds
// a function (sys_ni_syscall for the holes), so trailing zero entries are
// padding and dropped.
func (k *Kernel) readTable(name string, addr uint64) (SyscallTable, error) {
	n := k.extent(addr, maxTableEntries*8) / 8
	if n == 0 {
		return SyscallTable{}, fmt.Errorf("%s at %#x: no room before the next symbol", name, addr)
	}
	b := make([]byte, n*8)
	if err := k.ReadVirt(b, addr); err != nil {
		return SyscallTable{}, fmt.Errorf("%s: %w", name, err)
	}
	e := make([]uint64, n)
	for i := range e {
		e[i] = le64(b, i*8)
	}
	for len(e) > 0 && e[len(e)-1] == 0 {
		e = e[:len(e)-1]
	}
	return SyscallTable{Name: name, Addr: addr, Entries: e}, nil
}

// readFunction reads the code of the function name at addr and decodes
// its direct branches.
func (k *Kernel) readFunction(name string, addr uint64) (FunctionCode, error) {
	n := k.extent(addr, maxFunctionSize)
	if n == 0 {
		return FunctionCode{}, fmt.Errorf("%s at %#x: no room before the next symbol", name, addr)
	}
	code := make([]byte, n)
	if err := k.ReadVirt(code, addr); err != nil {
		return FunctionCode{}, fmt.Errorf("%s: %w", name, err)
	}
	return newFunctionCode(name, addr, code), nil
}

func newFunctionCode(name string, addr uint64, code []byte) FunctionCode {
	sum := sha256.Sum256(code)
	return FunctionCode{Name: name, Addr: addr, Size: uint64(len(code)), SHA256: hex.EncodeToString(sum[:]), Code: code, Calls: callSites(code, addr)}
}

// next returns the address of the first symbol above va.
func (s *Kallsyms) next(va uint64) (uint64, bool) {
	i := sort.Search(len(s.addrs), func(i int) bool { return s.addrs[i] > va })
	if i == len(s.addrs) {
		return 0, false
	}
	return s.addrs[i], true
}

// namesAt returns the names of the symbols that start exactly at va (a
// system call's wrappers share addresses: __x64_sys_ni_syscall is
// __ia32_sys_ni_syscall), at most a few.
func (s *Kallsyms) namesAt(va uint64) []string {
	i := sort.Search(len(s.addrs), func(i int) bool { return s.addrs[i] >= va })
	var out []string
	for ; i < len(s.addrs) && s.addrs[i] == va && len(out) < 16; i++ {
		if n := s.Symbol(i).Name; n != "" {
			out = append(out, n)
		}
	}
	return out
}
