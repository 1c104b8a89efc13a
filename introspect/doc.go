// Package introspect turns a guest's physical memory into the guest Linux
// kernel's own objects, with no profile and no registers required.
//
// Discover finds the kernel image in guest physical memory (its
// "Linux version" banner and its kallsyms tables), the KASLR shift of its
// virtual address, its page-table root (swapper_pg_dir / init_top_pgt) and
// the bases that CONFIG_RANDOMIZE_MEMORY moves (page_offset_base,
// vmemmap_base, vmalloc_base). It then reads the kernel's symbol table from
// guest memory (see kernel/kallsyms.c and scripts/kallsyms.c in the kernel
// tree) and, when the kernel was built with CONFIG_DEBUG_INFO_BTF, its BTF
// (Documentation/bpf/btf.rst), parsed with github.com/cilium/ebpf/btf.
//
// Guest memory is hostile input: every parser here is bounded, never
// panics, and returns wrapped errors.
package introspect
