# kvmscope tiny test guest.
#
# A multiboot (v1) ELF32 that QEMU loads with -kernel. It switches to 64-bit
# long mode with 4-level paging, writes a known pattern to known physical
# pages, publishes a ready marker, then does what the kernel command line says:
#
#   (nothing)  increment a uint64 counter in memory forever
#   exit=N     write N to isa-debug-exit (QEMU exits with status (N<<1)|1)
#   io=N       N one-byte port writes to IO_PORT (N KVM_EXIT_IOs), then exit=0
#   guard=N    wait until the host sets `go`, then N stores into pattern page 0
#              (which the host write-protects), one into page 1, M stores into
#              page 2 (touch=M), publish what page 0 holds, then spin
#   regs       spin until the host writes regs_magic into %r15 (which no
#              other code touches), publish %r14, then spin; the host can
#              then point %rip at regs_exit, which writes %eax to
#              isa-debug-exit. While it waits, it publishes what rdmsr
#              reads of MSR_KERNEL_GS_BASE (which only the host writes)
#
# Guest code here runs in ring 0, which the KVM backend of the development
# machines emulates one instruction at a time (~2e5 instr/s), so everything
# that can be precomputed is: the page tables are assembled, not built by a
# loop. Every address is a guest-physical address; internal/testguest mirrors
# them and checks this file's symbols against its constants after each build.

	.set MULTIBOOT_MAGIC,        0x1BADB002	# in the header
	.set MULTIBOOT_BOOT_MAGIC,   0x2BADB002	# in %eax at entry
	.set MULTIBOOT_INFO_CMDLINE, 1 << 2	# mbi->flags bit: cmdline valid

	.set MSR_EFER,  0xC0000080
	.set MSR_LSTAR, 0xC0000082
	.set MSR_KERNEL_GS_BASE, 0xC0000102
	.set EFER_LME,  1 << 8
	.set CR0_PE,    1 << 0
	.set CR0_PG,    1 << 31
	.set CR4_PAE,   1 << 5

	.set PTE_P,     1 << 0
	.set PTE_RW,    1 << 1
	.set PTE_PS,    1 << 7

	# The layout (mirrored in internal/testguest/layout.go).
	.globl pattern_gpa, pattern_pages, pattern_va, io_port, debug_exit_port, ready_value
	.set pattern_gpa,     0x200000		# PATTERN_PAGES 4 KiB pages from here
	.set pattern_pages,   8
	.set pattern_va,      0xffffffff80600000	# same pages, mapped by 4 KiB PTEs
	.set io_port,         0x0950		# unassigned on pc and q35 (0x700 is SMBus)
	.set debug_exit_port, 0xf4		# -device isa-debug-exit,iobase=0xf4
	.set ready_value,     0x0034365944414552	# "READY64\0"

	.set MODE_SPIN, 0
	.set MODE_EXIT, 1
	.set MODE_IO,   2
	.set MODE_GUARD, 3
	.set MODE_REGS, 4
	.globl regs_magic
	.set regs_magic, 0x5347455245504f43	# "COPEREGS"
	.globl guard_value
	.set guard_value, 0x2144454b434f4c42	# "BLOCKED!"

	.set CMDLINE_MAX, 4096			# bound on the command-line scan

# ---------------------------------------------------------------------------
	.section .multiboot, "a"
	.balign 4
multiboot_header:
	.long MULTIBOOT_MAGIC
	.long 0					# flags: load by ELF program headers
	.long -MULTIBOOT_MAGIC			# checksum: magic + flags + this == 0

# ---------------------------------------------------------------------------
	.text
	.code32
	.globl _start
_start:
	# Multiboot: 32-bit protected mode, paging off, flat segments,
	# %eax = boot magic, %ebx = physical address of the multiboot info.
	cli
	cld
	movl	%eax, boot_magic
	movl	%ebx, boot_info

	lgdt	gdt_ptr
	movl	$pml4, %ecx
	movl	%ecx, %cr3
	movl	%cr4, %ecx
	orl	$CR4_PAE, %ecx
	movl	%ecx, %cr4
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %ecx
	orl	$(CR0_PG | CR0_PE), %ecx
	movl	%ecx, %cr0			# now EFER.LMA=1, still 32-bit code
	ljmp	$0x08, $long_mode		# 64-bit code segment

	.code64
long_mode:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movq	$stack_top, %rsp

	# A known LSTAR (the guest never executes syscall), for the tests
	# that read the vCPUs' MSRs (testguest.LSTARValue).
	movl	$MSR_LSTAR, %ecx
	movl	$0x80601000, %eax
	movl	$0xffffffff, %edx
	wrmsr

	call	fill_patterns
	call	parse_cmdline

	movabsq	$ready_value, %rax
	movq	%rax, ready

	movq	mode, %rax
	cmpq	$MODE_EXIT, %rax
	je	do_exit
	cmpq	$MODE_IO, %rax
	je	do_io
	cmpq	$MODE_GUARD, %rax
	je	do_guard
	cmpq	$MODE_REGS, %rax
	je	do_regs

	.globl spin
spin:	# The default: a counter that advances as long as the vCPU runs.
	incq	counter
	jmp	spin

do_exit:
	movl	arg, %eax
	outl	%eax, $debug_exit_port
	jmp	halt

do_io:
	# Two instructions per write: each "out" is one KVM_EXIT_IO to QEMU.
	# (No "rep outsb": KVM batches string I/O into fewer exits.)
	movq	arg, %rcx
	movw	$io_port, %dx
	xorl	%eax, %eax
	jrcxz	2f
1:	outb	%al, %dx
	loop	1b
2:	movq	arg, %rax
	movq	%rax, io_done
	xorl	%eax, %eax
	outl	%eax, $debug_exit_port

do_guard:
	# The host protects pattern page 0, then sets go.
1:	pause
	cmpq	$0, go
	je	1b
	movabsq	$guard_value, %rax
	movq	arg, %rcx
	jrcxz	3f
	.globl guard_store
2:
guard_store:	# each store is blocked: KVM exits, kvmscope logs and skips it
	movq	%rax, pattern_va + 0x100
	loop	2b
3:	movq	%rax, pattern_va + 0x1100	# page 1: not protected, lands
	movq	pattern_va + 0x100, %rbx
	movq	%rbx, guard_seen
	movq	touch, %rcx		# writes elsewhere in the protected slot
	jrcxz	5f
4:	movq	%rcx, pattern_va + 0x2100
	loop	4b
5:	movq	$1, guard_done
	jmp	spin

do_regs:
	# Registers only the host changes: %r15 = regs_magic is the signal,
	# %r14 the value to publish. The counter shows the loop runs; the
	# MSR mirror shows what the vCPU itself reads of an MSR.
1:	incq	counter
	movl	$MSR_KERNEL_GS_BASE, %ecx
	rdmsr
	movl	%eax, msr_seen
	movl	%edx, msr_seen + 4
	cmpq	regs_magic_q, %r15
	jne	1b
	movq	%r14, regs_seen
	movq	$1, regs_done
	jmp	spin

	.globl regs_exit
regs_exit:	# reached only when the host sets %rip here: exit with %eax
	outl	%eax, $debug_exit_port
	jmp	halt

halt:	# Only reached when isa-debug-exit is missing.
	cli
	hlt
	jmp	halt

# fill_patterns writes page i of the pattern area, through its 4 KiB mapping
# at pattern_va, with the 32-byte line "KVMSCOPE-PATTERN page IIII/NNNN\n"
# (IIII = i, NNNN = pattern_pages, 4 lowercase hex digits) 128 times.
fill_patterns:
	xorl	%ebx, %ebx
	movq	$pattern_va, %rdi		# sign-extended imm32
.Lpage:
	movq	pattern_line, %r8
	movq	pattern_line+8, %r9
	movq	pattern_line+16, %r10
	movq	pattern_line+24, %r11
	movq	%r8, (%rdi)
	movq	%r9, 8(%rdi)
	movq	%r10, 16(%rdi)
	movq	%r11, 24(%rdi)
	movl	%ebx, %eax
	call	hex4
	movl	%edx, 22(%rdi)
	movl	$pattern_pages, %eax
	call	hex4
	movl	%edx, 27(%rdi)
	movq	(%rdi), %r8
	movq	8(%rdi), %r9
	movq	16(%rdi), %r10
	movq	24(%rdi), %r11
	leaq	32(%rdi), %rsi
	movl	$(4096 / 32 - 1), %ecx
1:	movq	%r8, (%rsi)
	movq	%r9, 8(%rsi)
	movq	%r10, 16(%rsi)
	movq	%r11, 24(%rsi)
	addq	$32, %rsi
	decl	%ecx
	jnz	1b
	addq	$4096, %rdi
	incl	%ebx
	cmpl	$pattern_pages, %ebx
	jb	.Lpage
	ret

# hex4 turns the low 16 bits of %eax into 4 hex digits in %edx, most
# significant digit in the low byte (so a 32-bit store writes them in order).
# Clobbers %eax, %ecx, %esi.
hex4:
	xorl	%edx, %edx
	movl	$4, %ecx
1:	movl	%eax, %esi
	andl	$0xf, %esi
	movzbl	hex_digits(%rsi), %esi
	shll	$8, %edx
	orl	%esi, %edx
	shrl	$4, %eax
	decl	%ecx
	jnz	1b
	ret

# parse_cmdline reads the multiboot command line (QEMU puts the kernel's file
# name first, then -append's text) and sets mode/arg from the last "exit=N",
# "io=N", "guard=N" or "regs" word (N decimal). Anything else is ignored.
parse_cmdline:
	cmpl	$MULTIBOOT_BOOT_MAGIC, boot_magic
	jne	.Lret
	movl	boot_info, %esi			# zero-extends into %rsi
	testl	$MULTIBOOT_INFO_CMDLINE, (%rsi)
	jz	.Lret
	movl	16(%rsi), %esi			# mbi->cmdline
	testl	%esi, %esi
	jz	.Lret
	movq	%rsi, cmdline
	leaq	CMDLINE_MAX(%rsi), %r8		# scan bound
.Lword:
	cmpq	%r8, %rsi
	jae	.Lret
	movzbl	(%rsi), %eax
	testl	%eax, %eax
	jz	.Lret
	cmpl	$' ', %eax
	jne	.Lmatch
	incq	%rsi
	jmp	.Lword
.Lmatch:
	cmpl	$0x74697865, (%rsi)		# "exit"
	jne	1f
	cmpb	$'=', 4(%rsi)
	jne	1f
	addq	$5, %rsi
	call	parse_uint
	movq	$MODE_EXIT, mode
	movq	%rax, arg
	jmp	.Lskip
1:	cmpl	$0x72617567, (%rsi)		# "guar"
	jne	1f
	cmpw	$0x3d64, 4(%rsi)		# "d="
	jne	1f
	addq	$6, %rsi
	call	parse_uint
	movq	$MODE_GUARD, mode
	movq	%rax, arg
	jmp	.Lskip
1:	cmpl	$0x63756f74, (%rsi)		# "touc"
	jne	1f
	cmpw	$0x3d68, 4(%rsi)		# "h="
	jne	1f
	addq	$6, %rsi
	call	parse_uint
	movq	%rax, touch
	jmp	.Lskip
1:	cmpl	$0x73676572, (%rsi)		# "regs"
	jne	1f
	movzbl	4(%rsi), %eax			# the whole word: NUL or space after
	testl	%eax, %eax
	jz	2f
	cmpl	$' ', %eax
	jne	1f
2:	movq	$MODE_REGS, mode
	jmp	.Lskip
1:	cmpw	$0x6f69, (%rsi)			# "io"
	jne	.Lskip
	cmpb	$'=', 2(%rsi)
	jne	.Lskip
	addq	$3, %rsi
	call	parse_uint
	movq	$MODE_IO, mode
	movq	%rax, arg
.Lskip:	# to the end of this word
	cmpq	%r8, %rsi
	jae	.Lret
	movzbl	(%rsi), %eax
	testl	%eax, %eax
	jz	.Lret
	cmpl	$' ', %eax
	je	.Lword
	incq	%rsi
	jmp	.Lskip
.Lret:
	ret

# parse_uint reads decimal digits at %rsi (below %r8) into %rax.
parse_uint:
	xorl	%eax, %eax
1:	cmpq	%r8, %rsi
	jae	2f
	movzbl	(%rsi), %ecx
	subl	$'0', %ecx
	cmpl	$9, %ecx
	ja	2f
	imulq	$10, %rax
	addq	%rcx, %rax
	incq	%rsi
	jmp	1b
2:	ret

# ---------------------------------------------------------------------------
	.section .rodata
	.balign 8
pattern_line:
	.ascii	"KVMSCOPE-PATTERN page ????/????\n"
hex_digits:
	.ascii	"0123456789abcdef"
	.balign 8
regs_magic_q:
	.quad	regs_magic

	.balign 8
gdt:
	.quad	0				# null
	.quad	0x00af9b000000ffff		# 0x08: 64-bit code, DPL 0, accessed
	.quad	0x00cf93000000ffff		# 0x10: data, accessed
gdt_end:
gdt_ptr:
	.word	gdt_end - gdt - 1
	.long	gdt

# ---------------------------------------------------------------------------
# Page tables. CR3 = pml4 (no PCID, no flag bits).
#   VA 0 .. 1 GiB      -> identity. The first 2 MiB through pt_lo with 4 KiB
#                         pages (page 0 not present, to catch null pointers);
#                         the rest with 2 MiB pages.
#   VA pattern_va + i*4 KiB -> pattern_gpa + i*4 KiB, i < pattern_pages,
#                         through pml4[511] -> pdpt_hi[510] -> pd_hi[3] -> pt_hi[i].
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.long	pdpt_lo + PTE_P + PTE_RW, 0
	.fill	510, 8, 0
	.long	pdpt_hi + PTE_P + PTE_RW, 0

	.balign 4096
pdpt_lo:
	.long	pd_lo + PTE_P + PTE_RW, 0
	.fill	511, 8, 0

	.balign 4096
pd_lo:
	.long	pt_lo + PTE_P + PTE_RW, 0
	.set	i, 1
	.rept	511
	.long	(i << 21) + PTE_PS + PTE_P + PTE_RW, 0
	.set	i, i + 1
	.endr

	.balign 4096
pt_lo:
	.quad	0
	.set	i, 1
	.rept	511
	.long	(i << 12) + PTE_P + PTE_RW, 0
	.set	i, i + 1
	.endr

	.balign 4096
pdpt_hi:
	.fill	510, 8, 0
	.long	pd_hi + PTE_P + PTE_RW, 0
	.quad	0

	.balign 4096
pd_hi:
	.fill	3, 8, 0
	.long	pt_hi + PTE_P + PTE_RW, 0
	.fill	508, 8, 0

	.balign 4096
pt_hi:
	.set	i, 0
	.rept	pattern_pages
	.long	pattern_gpa + (i << 12) + PTE_P + PTE_RW, 0
	.set	i, i + 1
	.endr
	.fill	512 - pattern_pages, 8, 0

# ---------------------------------------------------------------------------
# Status page: what the guest publishes for the host to read.
	.section .bss.status, "aw", @nobits
	.balign 4096
	.globl status, ready, boot_magic, boot_info, mode, arg, io_done, cmdline, counter
	.globl go, guard_seen, guard_done, touch, regs_seen, regs_done, msr_seen
status:
ready:		.skip 8		# +0x00 ready_value once in long mode, patterns written
boot_magic:	.skip 4		# +0x08 %eax at entry (0x2badb002)
boot_info:	.skip 4		# +0x0c %ebx at entry (multiboot info)
mode:		.skip 8		# +0x10 0 spin, 1 exit, 2 io, 3 guard, 4 regs
arg:		.skip 8		# +0x18 N of exit=N / io=N
io_done:	.skip 8		# +0x20 port writes done (io mode, set at the end)
cmdline:	.skip 8		# +0x28 command line address, 0 if none
		.skip 0x10
counter:	.skip 8		# +0x40 the spinning counter
go:		.skip 8		# +0x48 guard mode: the host sets it once it protects page 0
guard_seen:	.skip 8		# +0x50 guard mode: what page 0 held after the stores
guard_done:	.skip 8		# +0x58 guard mode: 1 when done
touch:		.skip 8		# +0x60 M of touch=M
regs_seen:	.skip 8		# +0x68 regs mode: %r14 when %r15 held regs_magic
regs_done:	.skip 8		# +0x70 regs mode: 1 once regs_seen is written
msr_seen:	.skip 8		# +0x78 regs mode: MSR_KERNEL_GS_BASE as rdmsr reads it
	.balign 4096

	.section .bss, "aw", @nobits
	.balign 16
stack:	.skip 8192
stack_top:

	.section .note.GNU-stack, "", @progbits
