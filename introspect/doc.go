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
// # Cross-views: hidden processes and modules
//
// Kernel.CrossViewTasks and Kernel.CrossViewModules enumerate the same
// objects through independent kernel structures and name what one view
// sees and the primary list does not, as a rootkit that unlinks a task
// or a module (DKOM) leaves it:
//
//   - tasks: init_task.tasks, what Processes lists (with the threads on
//     the thread lists of its leaders).
//   - pid_idr: init_pid_ns.idr, an xarray (radix tree before 4.20) of
//     struct pid; pid->tasks[PIDTYPE_PID].first is the task's
//     pid_links[PIDTYPE_PID], and numbers[0].nr must equal the index.
//     The walk checks every node's shift, parent, slot and tree pointers.
//     Offsets: BTF (pid_namespace.idr.idr_rt.xa_head, xa_node.slots,
//     pid.tasks, pid.numbers, task_struct.pid_links); without BTF the
//     xarray layout (unchanged since 4.20) is checked by the walk itself,
//     pid.numbers is where every entry holds its own index followed by
//     &init_pid_ns, and pid.tasks/pid_links the pair for which the entry
//     of every listed task points to one fixed offset in the task whose
//     pprev points back.
//   - runqueue: rq->curr of every online CPU (runqueues +
//     __per_cpu_offset[cpu], nr_cpu_ids, __cpu_online_mask). Offsets: BTF
//     rq.curr and rq.idle; without BTF rq.idle holds init_task in CPU 0's
//     rq and swapper/N in CPU N's (followed by rq->stop, migration/N, in
//     6.x; in 7.x curr and idle head struct rq and the later of the two
//     is idle), and rq.curr is the nearest pointer before it that leads,
//     on every CPU, to the idle task, a task another view knows, or a
//     task_struct by structure (a name, a pid, on its own thread list:
//     the running task may be hidden from every list). With BTF the CFS
//     tasks queued on each CPU (rq->cfs_tasks) are read too.
//   - thread_group: signal->thread_head / thread_node of every group a
//     view knows (the offsets the solver already finds).
//   - modules: the modules list; module_kset: the kobjects on
//     module_kset's list (kobject.entry, kobject.name, module_kobject.mod
//     from BTF, else the kobject layout checked on every entry: its kset
//     pointer leads back, mod is NULL or in the module area);
//     module_carve: struct modules carved out of the mapped 4 KiB pages of
//     the module area, at most 32768 pages: valid name and state, list
//     links that are kernel addresses or list_del's poison, the core
//     (mem[MOD_DATA] since 6.4) region holding the struct, mkobj.mod
//     pointing back (BTF, or solved from the listed modules).
//
// Only objects absent from the primary list (or, for live tasks, from the
// allocator) are findings: a task missing from the runqueues merely
// sleeps; idle tasks are on no list by design; exiting tasks are warned
// about, not reported. A view that cannot run says why (ViewResult.Ran,
// Reason). Damaged lists are data: Processes and Modules return what they
// read before the break with a *PartialError, and the cross-views then
// name the tasks beyond it. The parsers are fuzzed in fuzz_xview_test.go.
//
// Kernel.Found records which way each value was found. Guest memory is
// hostile input: every parser here is bounded, never panics, and returns
// wrapped errors; the fuzz targets are in fuzz_kernel_test.go.
package introspect
