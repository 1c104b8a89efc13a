package introspect

import (
	"encoding/binary"
	"slices"
	"testing"
)

// Forged memory for the cross-views: the tasks of forgedTasks plus, at
// fixed offsets, the kernel objects the other views read. Offsets are
// from the start of the image (fuzzBase).
const (
	fxNS      = 0x4080 // init_pid_ns (xa_head at +8)
	fxNode    = 0x4100 // the one xa_node (552 bytes)
	fxPids    = 0x4400 // struct pid i at fxPids + 0x80*i
	fxRQ      = 0x4c00 // runqueues (CPU 0's rq; curr at 0x10, idle at 0x18)
	fxKsetObj = 0x4d00 // the kset; its list at 0
	fxKobj    = 0x4d80 // one kobject (a built-in's parameters: mod NULL)
	fxKname   = 0x4df0
	fxNrCPU   = 0x4e00 // nr_cpu_ids
	fxPerCPU  = 0x4e10 // __per_cpu_offset
	fxKset    = 0x4e20 // module_kset (a pointer to the kset)
	fxLinks   = 0x250  // task_struct.pid_links in the forged tasks
	fxTasks   = 16
	fxSize    = 0x5000
)

// forgedXView builds the tasks with their pids in an xarray, one CPU's
// runqueue running init_task, and a module kset with one built-in entry.
func forgedXView() []byte {
	mem := make([]byte, fxSize)
	copy(mem, forgedTasks(fxTasks))
	put := func(off int, v uint64) { binary.LittleEndian.PutUint64(mem[off:], v) }
	va := func(off int) uint64 { return fuzzBase + uint64(off) }
	put(fxNS+8, va(fxNode)|2) // xa_head: an internal node entry
	// xa_node: shift 0, offset 0, parent NULL, array = the xarray.
	put(fxNode+nodeArray, va(fxNS))
	for i := 1; i < fxTasks; i++ {
		p := fxPids + 0x80*i
		put(fxNode+nodeSlotsDefault+8*i, va(p))
		task := i * fuzzTask
		put(p+0x10, va(task+fxLinks)) // tasks[PIDTYPE_PID].first
		binary.LittleEndian.PutUint32(mem[p+0x60:], uint32(i))
		put(p+0x68, va(fxNS))           // numbers[0].ns
		put(task+fxLinks+8, va(p+0x10)) // pprev
	}
	binary.LittleEndian.PutUint32(mem[fxNrCPU:], 1)
	put(fxRQ+0x10, va(0))
	put(fxRQ+0x18, va(0))
	put(fxKset, va(fxKsetObj))
	put(fxKsetObj, va(fxKobj+8))
	put(fxKsetObj+8, va(fxKobj+8))
	put(fxKobj+8, va(fxKsetObj))
	put(fxKobj+16, va(fxKsetObj))
	put(fxKobj, va(fxKname))
	put(fxKobj+kobjKsetDefault, va(fxKsetObj))
	copy(mem[fxKname:], "printk\x00")
	return mem
}

// testSyms is a symbol table of the given names.
func testSyms(syms map[string]uint64) *Kallsyms {
	s := &Kallsyms{byName: map[string]int{}}
	for n, a := range syms {
		s.byName[n] = len(s.addrs)
		s.addrs = append(s.addrs, a)
	}
	s.once.Do(func() {})
	return s
}

func fuzzXViewKernel(mem []byte) *Kernel {
	k := fuzzKernel(mem)
	k.Version = KernelVersion{6, 1, 0}
	k.Syms = testSyms(map[string]uint64{
		"init_task": fuzzBase, "init_pid_ns": fuzzBase + fxNS, "runqueues": fuzzBase + fxRQ,
		"__per_cpu_offset": fuzzBase + fxPerCPU, "nr_cpu_ids": fuzzBase + fxNrCPU,
		"module_kset": fuzzBase + fxKset, "modules": fuzzBase + fuzzMods,
	})
	return k
}

// TestCrossViewForged checks the findings' logic on forged memory: none
// on the clean image; a task unlinked from the tasks list is seen by the
// allocator; a listed task whose pid is gone from the allocator is named
// as missing from it.
func TestCrossViewForged(t *testing.T) {
	k := fuzzXViewKernel(forgedXView())
	tv, err := crossViewTasks(k, fuzzOffsets(), fuzzBase)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{ViewTasks: fxTasks, ViewPidIDR: fxTasks - 1, ViewRunqueue: 1, ViewThreadGroup: fxTasks}
	for _, v := range tv.Views {
		if !v.Ran || v.Reason != "" || v.Count != want[v.Name] {
			t.Errorf("view %+v, want ran with %d", v, want[v.Name])
		}
	}
	if len(tv.Hidden) != 0 || len(tv.Warnings) != 0 {
		t.Errorf("clean: hidden %+v, warnings %q", tv.Hidden, tv.Warnings)
	}

	mem := forgedXView()
	put := func(off int, v uint64) { binary.LittleEndian.PutUint64(mem[off:], v) }
	// Unlink task 3: 2.next = 4, 4.prev = 2.
	put(2*fuzzTask+fTasks, fuzzBase+4*fuzzTask+fTasks)
	put(4*fuzzTask+fTasks+8, fuzzBase+2*fuzzTask+fTasks)
	// Take pid 2 out of the allocator.
	put(fxNode+nodeSlotsDefault+8*2, 0)
	tv, err = crossViewTasks(fuzzXViewKernel(mem), fuzzOffsets(), fuzzBase)
	if err != nil {
		t.Fatal(err)
	}
	if len(tv.Hidden) != 2 {
		t.Fatalf("hidden %+v, want pids 2 and 3; views %+v", tv.Hidden, tv.Views)
	}
	if h := tv.Hidden[0]; h.PID != 2 || !slices.Contains(h.MissingFrom, ViewPidIDR) || !slices.Contains(h.SeenBy, ViewTasks) {
		t.Errorf("finding %+v: want pid 2 listed, missing from pid_idr", h)
	}
	if h := tv.Hidden[1]; h.PID != 3 || !slices.Contains(h.SeenBy, ViewPidIDR) || !slices.Contains(h.MissingFrom, ViewTasks) {
		t.Errorf("finding %+v: want pid 3 seen by pid_idr, missing from tasks", h)
	}
}

// FuzzCrossViewTasks runs the cross-views (tasks list, xarray walk and
// struct pid solver, runqueue solver, thread lists) on forged memory:
// they must end in bounded time without panicking.
func FuzzCrossViewTasks(f *testing.F) {
	f.Add(forgedXView())
	loop := forgedXView()
	binary.LittleEndian.PutUint64(loop[fxNode+nodeSlotsDefault+8:], (fuzzBase+fxNode)|2) // a node in its own slot
	f.Add(loop)
	f.Add(forgedTasks(5))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > fxSize {
			data = data[:fxSize]
		}
		mem := make([]byte, fxSize)
		copy(mem, data)
		k := fuzzXViewKernel(mem)
		if len(data) > 0 && data[len(data)-1]&1 != 0 {
			k.Version = KernelVersion{4, 19, 0} // the radix tree's tagging
		}
		tv, err := crossViewTasks(k, fuzzOffsets(), fuzzBase)
		if err == nil && len(tv.Hidden) > 4*maxTasks {
			t.Fatalf("%d hidden tasks from %d bytes", len(tv.Hidden), len(data))
		}
	})
}

// Forged modules for the module views, mapped in the module area.
const (
	fmBase   = 0xffffffffc0100000
	fmModule = 0x1000 // struct module (fuzzOffsets' layout)
	fmHead   = 0x3000 // the modules list head
	fmKset   = 0x3100 // module_kset's kset
	fmKsetP  = 0x3180 // module_kset, the pointer
	fmKobj   = fmModule + 0x200
	fmSelf   = 0x100 // module.mkobj.mod in the forged layout
)

// forgedModules builds one module on the modules list and on the kset.
func forgedModules() []byte {
	mem := make([]byte, 0x4000)
	put := func(off int, v uint64) { binary.LittleEndian.PutUint64(mem[off:], v) }
	va := func(off int) uint64 { return fmBase + uint64(off) }
	m := fmModule
	put(m+8, va(fmHead)) // list
	put(m+16, va(fmHead))
	put(fmHead, va(m+8))
	put(fmHead+8, va(m+8))
	copy(mem[m+24:], "dummy")
	put(m+0x140, fmBase) // core_layout: base, size
	binary.LittleEndian.PutUint32(mem[m+0x148:], 0x4000)
	put(m+fmSelf, va(m))
	// The kobject: name, entry, kset; mod.
	put(fmKsetP, va(fmKset))
	put(fmKset, va(fmKobj+8))
	put(fmKset+8, va(fmKobj+8))
	put(fmKobj, va(m+24))
	put(fmKobj+8, va(fmKset))
	put(fmKobj+16, va(fmKset))
	put(fmKobj+kobjKsetDefault, va(fmKset))
	put(fmKobj+mkobjModDefault, va(m))
	return mem
}

func fuzzModuleKernel(mem []byte) *Kernel {
	k := &Kernel{Mem: forgedMem(mem), imageSize: uint64(len(mem)),
		Record: Record{TextVA: fmBase, Levels: 4, PageOffsetBase: 0xffff888000000000}}
	k.Syms = testSyms(map[string]uint64{"modules": fmBase + fmHead, "module_kset": fmBase + fmKsetP})
	return k
}

// TestModuleViewsForged checks the module views on forged memory: the
// kset and the carve find the listed module; unlinked, it is hidden.
func TestModuleViewsForged(t *testing.T) {
	mem := forgedModules()
	k := fuzzModuleKernel(mem)
	mv, err := k.CrossViewModules(fuzzOffsets())
	if err != nil {
		t.Fatal(err)
	}
	if v := viewByName(mv.Views, ViewModuleKset); !v.Ran || v.Count != 1 || len(mv.Hidden) != 0 {
		t.Fatalf("views %+v, hidden %+v", mv.Views, mv.Hidden)
	}
	// The carve needs page tables, which the forged kernel lacks.
	if v := viewByName(mv.Views, ViewModuleCarve); v.Ran || v.Reason == "" {
		t.Errorf("carve without page tables: %+v", v)
	}
	c, err := newModuleCheck(k, fuzzOffsets(), &viewOffsets{moduleMkobj: solved(fmSelf, "")}, fmBase, fmBase+0x4000)
	if err != nil {
		t.Fatal(err)
	}
	ms := k.carveModules(fuzzOffsets(), c, []uint64{fmBase, fmBase + 0x1000, fmBase + 0x2000, fmBase + 0x3000})
	if len(ms) != 1 || ms[0].Name != "dummy" || ms[0].Addr != fmBase+fmModule {
		t.Fatalf("carved %+v", ms)
	}
	// Unlink it: the list is empty, the kset still holds it.
	binary.LittleEndian.PutUint64(mem[fmHead:], fmBase+fmHead)
	binary.LittleEndian.PutUint64(mem[fmHead+8:], fmBase+fmHead)
	mv, err = k.CrossViewModules(fuzzOffsets())
	if err != nil {
		t.Fatal(err)
	}
	if len(mv.Hidden) != 1 || mv.Hidden[0].Name != "dummy" || !slices.Contains(mv.Hidden[0].SeenBy, ViewModuleKset) {
		t.Fatalf("hidden %+v; views %+v", mv.Hidden, mv.Views)
	}
}

// FuzzModuleViews runs the module list, kset and carve parsers on forged
// memory.
func FuzzModuleViews(f *testing.F) {
	f.Add(forgedModules())
	f.Add(make([]byte, 0x4000))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		mem := make([]byte, 0x4000)
		copy(mem, data)
		k := fuzzModuleKernel(mem)
		k.CrossViewModules(fuzzOffsets())
		c, err := newModuleCheck(k, fuzzOffsets(), &viewOffsets{moduleMkobj: solved(fmSelf, "")}, fmBase, fmBase+0x4000)
		if err != nil {
			t.Fatal(err)
		}
		if ms := k.carveModules(fuzzOffsets(), c, []uint64{fmBase, fmBase + 0x1000, fmBase + 0x2000, fmBase + 0x3000}); len(ms) > 0x4000/8 {
			t.Fatalf("%d modules carved from 16 KiB", len(ms))
		}
	})
}

// TestModuleCarveMem checks the carve on the 6.4+ layout, module.mem[]:
// the struct lies in mem[MOD_DATA], one stride after mem[MOD_TEXT].
func TestModuleCarveMem(t *testing.T) {
	mem := forgedModules()
	m := fmModule
	const stride = 0x38
	off := fuzzOffsets()
	off.ModuleMemStride = solved(stride, "")
	// mem[MOD_TEXT] elsewhere, mem[MOD_DATA] holding the struct.
	binary.LittleEndian.PutUint64(mem[m+0x140:], fmBase+0x10000)
	binary.LittleEndian.PutUint32(mem[m+0x148:], 0x2000)
	binary.LittleEndian.PutUint64(mem[m+0x140+stride:], fmBase)
	binary.LittleEndian.PutUint32(mem[m+0x148+stride:], 0x4000)
	k := fuzzModuleKernel(mem)
	pages := []uint64{fmBase, fmBase + 0x1000, fmBase + 0x2000, fmBase + 0x3000}
	c, err := newModuleCheck(k, off, &viewOffsets{moduleMkobj: solved(fmSelf, "")}, fmBase, fmBase+0x4000)
	if err != nil {
		t.Fatal(err)
	}
	if ms := k.carveModules(off, c, pages); len(ms) != 1 || ms[0].Name != "dummy" {
		t.Fatalf("6.4+ layout: carved %+v", ms)
	}
	// Read as the old layout, core_layout (the text pair) does not hold
	// the struct: nothing is carved.
	off.ModuleMemStride = Offset{}
	c, err = newModuleCheck(k, off, &viewOffsets{moduleMkobj: solved(fmSelf, "")}, fmBase, fmBase+0x4000)
	if err != nil {
		t.Fatal(err)
	}
	if ms := k.carveModules(off, c, pages); len(ms) != 0 {
		t.Fatalf("old layout on 6.4+ memory: carved %+v", ms)
	}
}
