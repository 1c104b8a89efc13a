// Package guestmem holds a guest's physical memory, the translation of guest
// virtual addresses through the guest's own page tables, and the registers of
// its vCPUs.
//
// Every source of guest memory (a live QEMU process under kvmscope's tracer,
// a QEMU running TCG reached over QMP, an ELF core written by QEMU's
// dump-guest-memory) satisfies the same Memory interface, so the layers
// above (package introspect) never know where the bytes come from. This is
// memflow's connector → physical memory → virtual memory layering.
//
// Guest memory is hostile input: nothing here trusts a value read from it.
package guestmem
