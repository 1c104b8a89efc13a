// Package introspect turns a guest's physical memory into the guest Linux
// kernel's own objects, with no profile and no registers required.
//
// Discover finds, in this order:
//
//   - the kallsyms tables (kernel/kallsyms.c, scripts/kallsyms.c), by their
//     structure: the token table holds the digits as single-character
//     tokens 0x30..0x39, the token index follows it, kallsyms_num_syms
//     precedes names that decode to exactly that many entries and end
//     where kallsyms_markers begin, and the address array sits where the
//     layout of the kernel's version puts it (absolute, base-relative with
//     or without absolute per-CPU symbols, the 6.4 reordering, 7.x
//     PC-relative offsets). Without registers RAM is first sampled for
//     pages that look like a sorted address array; with a vCPU in the
//     kernel, the scan starts at the code it runs.
//   - the image's physical base and KASLR virtual shift, from the kernel's
//     own page table for its image, level2_kernel_pgt (head_64.S): after
//     boot it maps exactly _text.._end with 2 MiB pages, so the entry that
//     maps the image gives the virtual address (index) and the physical one
//     (value).
//   - the kernel's PGD (init_top_pgt) and paging levels: by symbol when
//     kallsyms has data symbols, else as the table in the image whose last
//     entry leads to level2_kernel_pgt. vCPU registers, when given, are
//     cross-checked (their CR3, or its PTI kernel half, must map _text to
//     the same physical address).
//   - page_offset_base, vmalloc_base and vmemmap_base (moved by
//     CONFIG_RANDOMIZE_MEMORY, arch/x86/mm/kaslr.c): the kernel's variables,
//     else the fixed layout when it maps physical 0, else the regions as
//     the PGD lays them out.
//   - linux_banner and the version, and the kernel's BTF
//     (CONFIG_DEBUG_INFO_BTF, __start_BTF..__stop_BTF or by its header;
//     Documentation/bpf/btf.rst), parsed with github.com/cilium/ebpf/btf
//     for struct member offsets.
//
// Kernel.ReadDispatch, Kernel.Judge and Compare check the guest's system-call
// dispatch (tables, x64_sys_call and the entry code, the IDT) for
// tampering; dispatch.go explains how.
//
// Kernel.Found records which way each value was found. Guest memory is
// hostile input: every parser here is bounded, never panics, and returns
// wrapped errors; the fuzz targets are in fuzz_kernel_test.go.
package introspect
