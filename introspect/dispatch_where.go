package introspect

import (
	"bytes"
	"fmt"
	"strings"
)

// Where a dispatch target is, and what it is called: core kernel text by
// kallsyms, a module by the module list, an ftrace trampoline by its
// bytes, anything else by the region it falls in.

// resolver names addresses for one Judge or Compare. It reads the module
// list and the ftrace templates only when an address needs them, once.
type resolver struct {
	k          *Kernel // nil: no symbols
	start, end uint64  // core kernel text
	fentry     uint64  // __fentry__, 0 if none
	ftrace     map[uint64]bool

	modsRead bool
	mods     []Module
	modsErr  error

	templates [][]byte // ftrace_caller, ftrace_regs_caller up to their op-pointer loads
	tmplRead  bool
	tramps    map[uint64]bool
}

// ftraceEntries are where a traced function's NOP5 may call: the shared
// callers, and __fentry__ where the site was never made a NOP.
var ftraceEntries = []string{"ftrace_caller", "ftrace_regs_caller", "__fentry__"}

// ftraceTemplates are what x86's create_trampoline copies into each
// trampoline: the caller from its start to its op-pointer load, which is
// the first byte it rewrites (arch/x86/kernel/ftrace.c).
var ftraceTemplates = [][2]string{{"ftrace_caller", "ftrace_caller_op_ptr"}, {"ftrace_regs_caller", "ftrace_regs_caller_op_ptr"}}

func newResolver(k *Kernel, d *Dispatch) *resolver {
	r := &resolver{k: k, ftrace: map[uint64]bool{}, tramps: map[uint64]bool{}}
	if k != nil && k.Syms != nil {
		r.start, r.end, _ = k.coreText()
		for _, n := range ftraceEntries {
			if a, ok := k.Symbol(n); ok {
				r.ftrace[a] = true
			}
		}
		r.fentry, _ = k.Symbol("__fentry__")
	}
	if r.end == 0 && d != nil {
		r.start, r.end = d.TextStart, d.TextEnd
	}
	return r
}

func (r *resolver) inText(va uint64) bool { return va >= r.start && va < r.end }

// symbol is what va is called: "name+0xoff" in core kernel text, "name
// [module]" in a module, "ftrace_trampoline [__builtin__ftrace]" (as
// /proc/kallsyms calls it) in a trampoline, "" elsewhere.
func (r *resolver) symbol(va uint64) string {
	if r.k == nil || r.k.Syms == nil {
		return ""
	}
	if r.inText(va) {
		if names := r.k.Syms.namesAt(va); len(names) > 1 {
			return preferredName(names) + "+0x0"
		}
		if name, off, ok := r.k.SymbolAt(va); ok {
			return fmt.Sprintf("%s+%#x", name, off)
		}
		return ""
	}
	if r.inImage(va) {
		return ""
	}
	if m, ok := r.module(va); ok {
		return m.Name + " [module]"
	}
	if r.isTrampoline(va) {
		return "ftrace_trampoline [__builtin__ftrace]"
	}
	return ""
}

// where says in words where va is.
func (r *resolver) where(va uint64) string {
	switch {
	case r.inText(va):
		return "core kernel text"
	case r.k == nil:
		return "outside core kernel text"
	}
	if r.inImage(va) {
		// With KASLR the image may sit above MODULES_VADDR's default:
		// the image is told first.
		if a, ok1 := r.k.Symbol("_sinittext"); ok1 {
			if b, ok2 := r.k.Symbol("_einittext"); ok2 && va >= a && va < b {
				return "in init text, freed after boot"
			}
		}
		if name, off, ok := r.k.SymbolAt(va); ok {
			return fmt.Sprintf("in the kernel image outside its text, at %s+%#x", name, off)
		}
		return "in the kernel image outside its text"
	}
	if m, ok := r.module(va); ok {
		return fmt.Sprintf("in module %s at +%#x", m.Name, va-m.Base)
	}
	if r.isTrampoline(va) {
		return "an ftrace trampoline"
	}
	if r.inModuleArea(va) {
		why := "in the module area, in no listed module (a hidden module, BPF or freed memory)"
		if r.modsErr != nil {
			why += fmt.Sprintf("; the module list could not be read: %v", r.modsErr)
		}
		return why
	}
	return "outside all kernel text"
}

// inImage reports whether va is in the kernel image (_text.._end).
func (r *resolver) inImage(va uint64) bool {
	return r.k != nil && r.k.imageSize != 0 && va >= r.k.TextVA && va-r.k.TextVA < r.k.imageSize
}

// inModuleArea reports whether va is in the module area: from
// MODULES_VADDR, which is __START_KERNEL_map + KERNEL_IMAGE_SIZE, 1 GiB
// with CONFIG_RANDOMIZE_BASE (so for any kernel KASLR moved, or whose image
// reaches past 512 MiB) and 512 MiB without, to MODULES_END.
func (r *resolver) inModuleArea(va uint64) bool {
	if r.k == nil || r.inImage(va) {
		return false
	}
	lo := uint64(modulesStart)
	if r.k.KASLRShift != 0 || r.k.TextVA+r.k.imageSize > modulesStart {
		lo = startKernelMap + 1<<30
	}
	return va >= lo && va < modulesEnd
}

// earlyIDTHandler reports whether h is the early handler of vector v:
// head_64.S points the 32 exception vectors at early_idt_handler_array
// (9 bytes each, 13 with IBT's endbr64), and the vectors the kernel never
// installs a handler for later (reserved ones, #MC without MCE) keep
// pointing there, into init text freed after boot.
func (r *resolver) earlyIDTHandler(v int, h uint64) bool {
	if r.k == nil || v < 0 || v >= 32 {
		return false
	}
	a, ok := r.k.Symbol("early_idt_handler_array")
	return ok && h >= a && (h-a == uint64(v)*9 || h-a == uint64(v)*13)
}

// addrDeviation is a deviation whose current value is the address va.
func (r *resolver) addrDeviation(what, kind string, va uint64, why string) Deviation {
	d := Deviation{What: what, Kind: kind, Current: fmt.Sprintf("%#x", va), CurrentSymbol: r.symbol(va), Detail: r.where(va)}
	if why != "" {
		d.Detail = why + ": " + d.Detail
	}
	return d
}

// syscallPrefixes are the names of system-call functions: the pt_regs
// wrappers (4.17+), their sign-extending and inner halves, and the
// plain, compat and stub names of older kernels.
var syscallPrefixes = []string{
	"__x64_sys_", "__ia32_sys_", "__x32_compat_sys_", "__ia32_compat_sys_", "__x64_compat_sys_",
	"__se_sys_", "__se_compat_sys_", "__do_sys_", "__do_compat_sys_",
	"sys_", "SyS_", "compat_sys_", "sys32_", "stub_", "ptregs_",
}

func isSyscallName(name string) bool {
	for _, p := range syscallPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

// preferredName picks, among the names of one address, the x86-64
// wrapper, else the first system-call name, else the first.
func preferredName(names []string) string {
	for _, p := range []string{"__x64_sys_", "__ia32_sys_", "__x32_compat_sys_"} {
		for _, n := range names {
			if strings.HasPrefix(n, p) {
				return n
			}
		}
	}
	for _, n := range names {
		if isSyscallName(n) {
			return n
		}
	}
	return names[0]
}

// isSyscall reports whether va is the start of a system-call function in
// core kernel text. A call thunk in the function's padding (__pfx_NAME,
// call depth tracking) counts as the function.
func (r *resolver) isSyscall(va uint64) bool {
	if !r.inText(va) || r.k == nil || r.k.Syms == nil {
		return false
	}
	names := r.k.Syms.namesAt(va)
	if len(names) == 0 {
		if name, off, ok := r.k.SymbolAt(va); ok && strings.HasPrefix(name, "__pfx_") && off < 64 {
			names = []string{strings.TrimPrefix(name, "__pfx_")}
		}
	}
	for _, n := range names {
		if isSyscallName(n) {
			return true
		}
	}
	return false
}

// isHelper reports whether va, in core kernel text, is a helper the
// compiler calls from any function: the retpoline and return thunks
// (__x86_indirect_thunk_*, __x86_return_thunk, srso_return_thunk, ...)
// and __fentry__.
func (r *resolver) isHelper(va uint64) bool {
	if !r.inText(va) || r.k == nil {
		return false
	}
	name, off, ok := r.k.SymbolAt(va)
	return ok && off == 0 && (strings.Contains(name, "_thunk") || name == "__fentry__" || name == "__x86_return_skl")
}

// isFtrace reports whether va is where ftrace makes a traced function
// call: a shared caller in core text or a trampoline.
func (r *resolver) isFtrace(va uint64) bool { return r.ftrace[va] || r.isTrampoline(va) }

// patchTarget reports whether a NOP the kernel turned into a branch to va
// (or back) is its own runtime patching: core text or ftrace.
func (r *resolver) patchTarget(va uint64) bool { return r.inText(va) || r.isTrampoline(va) }

// isTrampoline reports whether va starts an ftrace trampoline: outside
// core text, in the module area (trampolines come from module_alloc /
// execmem), and starting with the bytes of the caller it was copied from.
func (r *resolver) isTrampoline(va uint64) bool {
	if !r.inModuleArea(va) {
		return false
	}
	if v, ok := r.tramps[va]; ok {
		return v
	}
	if !r.tmplRead {
		r.tmplRead = true
		for _, t := range ftraceTemplates {
			a, ok1 := r.k.Symbol(t[0])
			b, ok2 := r.k.Symbol(t[1])
			// Too short a prefix would match by chance; a real one is
			// ~100 bytes of register saves.
			if !ok1 || !ok2 || b <= a || b-a < 16 || !r.inText(a) {
				continue
			}
			buf := make([]byte, min(b-a, 256))
			if r.k.ReadVirt(buf, a) == nil {
				r.templates = append(r.templates, buf)
			}
		}
	}
	is := false
	for _, t := range r.templates {
		buf := make([]byte, len(t))
		if r.k.ReadVirt(buf, va) == nil && bytes.Equal(buf, t) {
			is = true
			break
		}
	}
	if len(r.tramps) < 1024 {
		r.tramps[va] = is
	}
	return is
}

// module returns the loaded module whose core covers va. The list is read
// on first need; Size is the sum of the module's regions, so for 6.4+
// (separately allocated regions) Base..Base+Size covers its text and may
// miss its data.
func (r *resolver) module(va uint64) (Module, bool) {
	if !r.inModuleArea(va) {
		return Module{}, false
	}
	if !r.modsRead {
		r.modsRead = true
		off, _ := FindOffsets(r.k) // partial offsets may still list modules
		if off == nil {
			off = &Offsets{}
		}
		mods, err := r.k.Modules(off)
		r.mods = mods
		if err != nil {
			r.modsErr = err
		}
	}
	for _, m := range r.mods {
		if va >= m.Base && va-m.Base < max(m.Size, 1) {
			return m, true
		}
	}
	return Module{}, false
}

// DescribeAddr names kernel virtual address va as integrity reports do:
// its symbol ("name+0xoff" in core kernel text, "name [module]" in a
// module, "" in no kernel text) and where it is, in words.
func (k *Kernel) DescribeAddr(va uint64) (symbol, where string) {
	r := newResolver(k, nil)
	return r.symbol(va), r.where(va)
}

// Locate names the dispatch location that holds va: "sys_call_table[62]"
// for a table entry, "x64_sys_call+0x1a3" inside a dispatch function, ""
// elsewhere.
func (d *Dispatch) Locate(va uint64) string {
	for _, t := range d.Tables {
		if va >= t.Addr && va-t.Addr < 8*uint64(len(t.Entries)) {
			return fmt.Sprintf("%s[%d]", t.Name, (va-t.Addr)/8)
		}
	}
	for _, f := range d.Functions {
		if va >= f.Addr && va-f.Addr < f.Size {
			return fmt.Sprintf("%s+%#x", f.Name, va-f.Addr)
		}
	}
	return ""
}
