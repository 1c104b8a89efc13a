package introspect

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// The cross-view tests boot the real guests, stop them, and hide objects
// by editing the guest's own lists in its memory through the live TCG
// source (writable), as a rootkit in the guest would (DKOM).

// xviewGuest is a booted, stopped guest with a writable memory source.
type xviewGuest struct {
	g    *testlinux.Guest
	mem  *guestmem.TCG
	k    *Kernel
	off  *Offsets
	mods []string
}

func bootXView(t *testing.T, kernel func(testlinux.Paths) string, withModules bool) *xviewGuest {
	t.Helper()
	g, mods := bootGuest(t, kernel, withModules)
	t.Cleanup(func() { g.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q, err := guestmem.DialQMP(ctx, g.SpareQMP())
	if err != nil {
		t.Fatalf("QMP: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	mem := guestmem.NewTCG(q, g.Pid, true)
	if _, err := g.QMP("stop", nil); err != nil {
		t.Fatalf("stop: %v", err)
	}
	k, err := Discover(mem, DiscoverOptions{})
	if err != nil {
		t.Fatalf("Discover: %v", err)
	}
	off, err := FindOffsets(k)
	if off == nil {
		t.Fatalf("FindOffsets: %v", err)
	}
	if err != nil {
		t.Logf("FindOffsets: %v", err)
	}
	t.Logf("%s, BTF %v", k.Banner, k.BTF != nil)
	return &xviewGuest{g: g, mem: mem, k: k, off: off, mods: mods}
}

// write64 writes v at kernel virtual address va of the guest and returns
// a function that puts the old value back.
func (x *xviewGuest) write64(t *testing.T, va, v uint64) func() {
	t.Helper()
	pa, err := x.k.VirtToPhys(va)
	if err != nil {
		t.Fatalf("translate %#x: %v", va, err)
	}
	old := make([]byte, 8)
	if _, err := x.mem.ReadAt(old, int64(pa)); err != nil {
		t.Fatal(err)
	}
	if _, err := x.mem.WriteAt(binary.LittleEndian.AppendUint64(nil, v), int64(pa)); err != nil {
		t.Fatalf("write %#x: %v", va, err)
	}
	x.k.Reset()
	return func() {
		if _, err := x.mem.WriteAt(old, int64(pa)); err != nil {
			t.Errorf("restore %#x: %v", va, err)
		}
		x.k.Reset()
	}
}

// unlink removes the node at node from its list (as list_del does to its
// neighbours, leaving the node's own links) and returns the undo.
func (x *xviewGuest) unlink(t *testing.T, node uint64) func() {
	t.Helper()
	next, err1 := x.k.ReadU64(node)
	prev, err2 := x.k.ReadU64(node + 8)
	if err1 != nil || err2 != nil {
		t.Fatalf("read links of %#x: %v %v", node, err1, err2)
	}
	u1 := x.write64(t, prev, next)   // prev->next = next
	u2 := x.write64(t, next+8, prev) // next->prev = prev
	return func() { u2(); u1() }
}

func viewByName(vs []ViewResult, name string) ViewResult {
	for _, v := range vs {
		if v.Name == name {
			return v
		}
	}
	return ViewResult{Name: name, Reason: "absent"}
}

// process is the last listed process named comm, and the list.
func (x *xviewGuest) process(t *testing.T, comm string) (*Process, []Process) {
	t.Helper()
	ps, err := x.k.Processes(x.off, ProcessOptions{NoCmdline: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := len(ps) - 1; i >= 0; i-- {
		if ps[i].Comm == comm {
			return &ps[i], ps
		}
	}
	t.Fatalf("no process %q", comm)
	return nil, nil
}

// checkCleanTasks checks the cross-views of an untouched guest: every
// view ran, nothing hidden, counts as Processes lists.
func checkCleanTasks(t *testing.T, k *Kernel, off *Offsets) {
	t.Helper()
	start := time.Now()
	tv, err := k.CrossViewTasks(off)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CrossViewTasks in %v: views %+v; warnings %q", time.Since(start), tv.Views, tv.Warnings)
	for name, o := range tv.Offsets {
		t.Logf("  %s = %#x (%s: %s)", name, o.Value, o.Source, o.How)
	}
	ps, err := k.Processes(off, ProcessOptions{NoCmdline: true})
	if err != nil {
		t.Fatal(err)
	}
	all, err := k.Processes(off, ProcessOptions{NoCmdline: true, Threads: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range tv.Views {
		if !v.Ran || v.Reason != "" {
			t.Errorf("view %s: ran %v, reason %q", v.Name, v.Ran, v.Reason)
		}
	}
	for _, h := range tv.Hidden {
		t.Errorf("hidden on a clean guest: %+v", h)
	}
	if got := viewByName(tv.Views, ViewThreadGroup).Count; got != len(all) {
		in := map[uint64]bool{}
		for _, p := range all {
			in[p.Task] = true
		}
		x := &xview{k: k, off: off, r: newTaskReader(k, off), infos: map[uint64]*taskInfo{}, budget: 1 << 20}
		for _, p := range all {
			ti := x.info(p.Task)
			if ti.threadsHead == 0 {
				continue
			}
			ns, d, _ := walkList(k, ti.threadsHead, 1000, nil)
			for _, n := range ns {
				th := n - uint64(off.TaskThreadNode.Value)
				if !in[th] {
					o := x.info(th)
					t.Logf("thread %#x pid %d tgid %d comm %q flags %#x state %#x (group of %d %q) not in Processes; damage %q", th, o.pid, o.tgid, o.comm, o.flags, o.state, p.PID, p.Comm, d)
				}
			}
		}
	}
	want := map[string]int{ViewTasks: len(ps), ViewThreadGroup: len(all), ViewPidIDR: len(all) - 1}
	for name, n := range want {
		if got := viewByName(tv.Views, name).Count; got != n {
			t.Errorf("view %s saw %d tasks, want %d (Processes: %d leaders, %d threads)", name, got, n, len(ps), len(all))
		}
	}
	if rq := viewByName(tv.Views, ViewRunqueue); rq.Count < 1 || rq.Count > len(all)+1 || k.BTF == nil && rq.Count > 2 {
		t.Errorf("runqueue view saw %d tasks on a 2-CPU guest", rq.Count)
	}
	t.Logf("tasks %d, thread_group %d, pid_idr %d, runqueue %d (Processes: %d leaders, %d threads)",
		viewByName(tv.Views, ViewTasks).Count, viewByName(tv.Views, ViewThreadGroup).Count,
		viewByName(tv.Views, ViewPidIDR).Count, viewByName(tv.Views, ViewRunqueue).Count, len(ps), len(all))
}

// hideProcess unlinks a user process from the tasks list and checks that
// Processes no longer lists it and CrossViewTasks names it.
func hideProcess(t *testing.T, x *xviewGuest, comm string) {
	victim, ps := x.process(t, comm)
	undo := x.unlink(t, victim.Task+uint64(x.off.TaskTasks.Value))
	defer undo()
	after, err := x.k.Processes(x.off, ProcessOptions{NoCmdline: true})
	if err != nil {
		t.Fatalf("Processes after unlinking: %v", err)
	}
	for _, p := range after {
		if p.PID == victim.PID {
			t.Fatalf("Processes still lists pid %d", p.PID)
		}
	}
	if len(after) != len(ps)-1 {
		t.Errorf("%d processes after hiding one of %d", len(after), len(ps))
	}
	tv, err := x.k.CrossViewTasks(x.off)
	if err != nil {
		t.Fatal(err)
	}
	var found []HiddenTask
	for _, h := range tv.Hidden {
		if h.TGID == victim.PID {
			found = append(found, h)
		} else {
			t.Errorf("unexpected finding %+v", h)
		}
	}
	if len(found) == 0 {
		t.Fatalf("hidden pid %d %q not found; views %+v, warnings %q", victim.PID, comm, tv.Views, tv.Warnings)
	}
	for _, h := range found {
		if !slices.Contains(h.SeenBy, ViewPidIDR) || !slices.Contains(h.MissingFrom, ViewTasks) {
			t.Errorf("finding %+v: want seen by pid_idr, missing from tasks", h)
		}
	}
	t.Logf("hidden process %d %q (%d threads) found: %+v", victim.PID, comm, victim.Threads, found)
	if len(found) != max(victim.Threads, 1) {
		t.Errorf("%d findings for a group of %d threads", len(found), victim.Threads)
	}
}

// forgeTaskList breaks the tasks list two ways and checks that Processes
// returns the tasks before the break with a *PartialError, and that
// CrossViewTasks names the tasks beyond it.
func forgeTaskList(t *testing.T, x *xviewGuest) {
	ps, err := x.k.Processes(x.off, ProcessOptions{NoCmdline: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) < 20 {
		t.Fatalf("only %d processes", len(ps))
	}
	lo := uint64(x.off.TaskTasks.Value)
	at := len(ps) / 2
	for _, c := range []struct {
		name  string
		forge func() func()
		n     int
		words string
	}{
		{"prev", func() func() { return x.write64(t, ps[at].Task+lo+8, ps[at].Task+lo+0x40) }, at, "prev is"},
		{"cycle", func() func() { return x.write64(t, ps[at].Task+lo, ps[3].Task+lo) }, at + 1, "appears twice"},
	} {
		t.Run(c.name, func(t *testing.T) {
			undo := c.forge()
			defer undo()
			got, err := x.k.Processes(x.off, ProcessOptions{})
			var pe *PartialError
			if !errors.As(err, &pe) {
				t.Fatalf("Processes on a forged list: %v (%T), want *PartialError", err, err)
			}
			if len(got) != c.n || !strings.Contains(err.Error(), c.words) {
				t.Fatalf("%d processes, %v; want %d and %q", len(got), err, c.n, c.words)
			}
			for i := range got {
				if got[i].PID != ps[i].PID {
					t.Fatalf("process %d: pid %d, want %d", i, got[i].PID, ps[i].PID)
				}
			}
			t.Logf("forged %s: %d of %d processes, %v", c.name, len(got), len(ps), err)
			tv, err := x.k.CrossViewTasks(x.off)
			if err != nil {
				t.Fatal(err)
			}
			tasks := viewByName(tv.Views, ViewTasks)
			if !tasks.Ran || !strings.Contains(tasks.Reason, "damaged") {
				t.Errorf("tasks view %+v does not report the damage", tasks)
			}
			beyond := map[int]bool{}
			for _, h := range tv.Hidden {
				beyond[h.TGID] = true
			}
			missed := 0
			for _, p := range ps[c.n:] {
				if !beyond[p.PID] {
					missed++
				}
			}
			if missed > 0 {
				t.Errorf("%d of the %d processes beyond the break not named (%d findings)", missed, len(ps)-c.n, len(tv.Hidden))
			}
			t.Logf("%d findings beyond the break", len(tv.Hidden))
		})
	}
}

func TestCrossViewDebian(t *testing.T) {
	x := bootXView(t, testlinux.Debian, true)
	t.Run("CleanTasks", func(t *testing.T) { checkCleanTasks(t, x.k, x.off) })
	t.Run("CleanModules", func(t *testing.T) { checkCleanModules(t, x.k, x.off, true) })
	t.Run("HideModule", func(t *testing.T) { hideModule(t, x) })
	t.Run("ForgedModuleList", func(t *testing.T) { forgeModuleList(t, x) })
	t.Run("HideModuleDeep", func(t *testing.T) { hideModuleDeep(t, x) })
	t.Run("HideProcess", func(t *testing.T) { hideProcess(t, x, "kvm-odd_name.x") })
	t.Run("HideThreadedProcess", func(t *testing.T) { hideProcess(t, x, "kvm-threads") })
	t.Run("HideFromPidIDR", func(t *testing.T) { hideFromIDR(t, x, "kvm-odd_name.x") })
	t.Run("HideButRunning", func(t *testing.T) { hideButRunning(t, x, "kvm-odd_name.x") })
	t.Run("HideExiting", func(t *testing.T) { hideExiting(t, x, "kvm-odd_name.x") })
	t.Run("HideThread", func(t *testing.T) { hideThread(t, x, "kvm-threads") })
	t.Run("ForgedTaskList", func(t *testing.T) { forgeTaskList(t, x) })
	t.Run("SolvedOffsets", func(t *testing.T) {
		// The views without BTF, on the same guest.
		nb := *x.k
		nb.BTF = nil
		off, err := SolveOffsets(&nb)
		if off == nil {
			t.Fatal(err)
		}
		checkCleanTasks(t, &nb, off)
		checkCleanModules(t, &nb, off, true)
		t.Run("HideModule", func(t *testing.T) {
			y := *x
			y.k, y.off = &nb, off
			hideModule(t, &y)
		})
		t.Run("HideModuleDeep", func(t *testing.T) {
			y := *x
			y.k, y.off = &nb, off
			hideModuleDeep(t, &y)
		})
		t.Run("HideButRunning", func(t *testing.T) {
			y := *x
			y.k, y.off = &nb, off
			hideButRunning(t, &y, "kvm-odd_name.x")
		})
	})
	t.Run("Dump", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "guest.core")
		if err := x.g.Dump(path); err != nil {
			t.Fatalf("dump: %v", err)
		}
		core, err := guestmem.OpenCore(path)
		if err != nil {
			t.Fatal(err)
		}
		defer core.Close()
		checkCleanTasks(t, x.k.On(core), x.off)
		checkCleanModules(t, x.k.On(core), x.off, true)
	})
	t.Run("Running", func(t *testing.T) { checkRunning(t, x) })
}

func TestCrossViewGokrazy(t *testing.T) {
	x := bootXView(t, testlinux.Gokrazy, false)
	t.Run("CleanTasks", func(t *testing.T) { checkCleanTasks(t, x.k, x.off) })
	// No module loaded and no BTF: struct module cannot be solved, so
	// the carve does not run (and says why); the kset view runs.
	t.Run("CleanModules", func(t *testing.T) { checkCleanModules(t, x.k, x.off, false) })
	t.Run("HideProcess", func(t *testing.T) { hideProcess(t, x, "kvm-odd_name.x") })
	t.Run("HideThreadedProcess", func(t *testing.T) { hideProcess(t, x, "kvm-threads") })
	t.Run("HideFromPidIDR", func(t *testing.T) { hideFromIDR(t, x, "kvm-odd_name.x") })
	t.Run("HideButRunning", func(t *testing.T) { hideButRunning(t, x, "kvm-odd_name.x") })
	t.Run("HideExiting", func(t *testing.T) { hideExiting(t, x, "kvm-odd_name.x") })
	t.Run("HideThread", func(t *testing.T) { hideThread(t, x, "kvm-threads") })
	t.Run("ForgedTaskList", func(t *testing.T) { forgeTaskList(t, x) })
	t.Run("Dump", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "guest.core")
		if err := x.g.Dump(path); err != nil {
			t.Fatalf("dump: %v", err)
		}
		core, err := guestmem.OpenCore(path)
		if err != nil {
			t.Fatal(err)
		}
		defer core.Close()
		checkCleanTasks(t, x.k.On(core), x.off)
		checkCleanModules(t, x.k.On(core), x.off, false)
	})
	t.Run("Running", func(t *testing.T) { checkRunning(t, x) })
}

// checkCleanModules checks the module cross-views of an untouched guest.
func checkCleanModules(t *testing.T, k *Kernel, off *Offsets, wantCarve bool) {
	t.Helper()
	start := time.Now()
	mv, err := k.CrossViewModules(off)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CrossViewModules in %v: views %+v; warnings %q", time.Since(start), mv.Views, mv.Warnings)
	for name, o := range mv.Offsets {
		t.Logf("  %s = %#x (%s: %s)", name, o.Value, o.Source, o.How)
	}
	ms, err := k.Modules(off)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range mv.Views {
		if v.Name == ViewModuleCarve && !wantCarve {
			if v.Ran || v.Reason == "" {
				t.Errorf("view %s: ran %v, reason %q; want not run, with a reason", v.Name, v.Ran, v.Reason)
			}
			continue
		}
		if !v.Ran || v.Reason != "" {
			t.Errorf("view %s: ran %v, reason %q", v.Name, v.Ran, v.Reason)
		}
		if v.Count != len(ms) {
			t.Errorf("view %s saw %d modules, Modules lists %d", v.Name, v.Count, len(ms))
		}
	}
	for _, h := range mv.Hidden {
		t.Errorf("hidden on a clean guest: %+v", h)
	}
	if len(mv.Warnings) > 0 {
		t.Errorf("warnings on a clean guest: %q", mv.Warnings)
	}
}

// hideModule unlinks a module from the modules list and checks that
// CrossViewModules names it.
func hideModule(t *testing.T, x *xviewGuest) {
	ms, err := x.k.Modules(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) < 2 {
		t.Fatalf("%d modules loaded, want >= 2 (%s/debian/modules)", len(ms), testlinux.Require(t).Dir)
	}
	victim := ms[1]
	undo := x.unlink(t, victim.Addr+uint64(x.off.ModuleList.Value))
	defer undo()
	after, err := x.k.Modules(x.off)
	if err != nil || len(after) != len(ms)-1 {
		t.Fatalf("Modules after unlinking %s: %d, %v", victim.Name, len(after), err)
	}
	mv, err := x.k.CrossViewModules(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(mv.Hidden) != 1 {
		t.Fatalf("hidden %+v, want %s; views %+v", mv.Hidden, victim.Name, mv.Views)
	}
	h := mv.Hidden[0]
	if h.Name != victim.Name || h.Addr != victim.Addr || h.Base != victim.Base || h.Size != victim.Size ||
		!slices.Contains(h.SeenBy, ViewModuleKset) || !slices.Contains(h.SeenBy, ViewModuleCarve) || !slices.Contains(h.MissingFrom, ViewModules) {
		t.Errorf("finding %+v, want %+v seen by module_kset and module_carve", h, victim)
	}
	t.Logf("hidden module found: %+v", h)
}

// hideFromIDR removes a user process's pid from the PID allocator (as a
// rootkit hides it from /proc, whose readdir walks the allocator) and
// checks that CrossViewTasks names it as listed but missing from pid_idr.
func hideFromIDR(t *testing.T, x *xviewGuest, comm string) {
	victim, _ := x.process(t, comm)
	slot := x.pidSlot(t, victim.PID)
	undo := x.write64(t, slot, 0)
	defer undo()
	tv, err := x.k.CrossViewTasks(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(tv.Hidden) != 1 {
		t.Fatalf("hidden %+v, want pid %d only; views %+v", tv.Hidden, victim.PID, tv.Views)
	}
	h := tv.Hidden[0]
	if h.PID != victim.PID || !slices.Contains(h.SeenBy, ViewTasks) || !slices.Contains(h.MissingFrom, ViewPidIDR) {
		t.Errorf("finding %+v: want pid %d seen by tasks, missing from pid_idr", h, victim.PID)
	}
	t.Logf("pid taken out of the allocator found: %+v", h)
}

// pidSlot returns the address of the allocator's slot for pid.
func (x *xviewGuest) pidSlot(t *testing.T, pid int) uint64 {
	t.Helper()
	ns, _ := x.k.Symbol("init_pid_ns")
	xv := &xview{k: x.k, off: x.off, r: newTaskReader(x.k, x.off), infos: map[uint64]*taskInfo{}}
	if x.k.BTF != nil {
		if err := x.k.pidViewFromBTF(&xv.v); err != nil {
			t.Fatal(err)
		}
	} else {
		xv.v.xaHead, xv.v.nodeSlots, xv.v.chunk = solved(xaHeadDefault, ""), solved(nodeSlotsDefault, ""), chunkDefault
	}
	head := ns + uint64(xv.v.xaHead.Value)
	entries, damage, err := walkIDR(x.k, head, head-8, xv.v.nodeSlots.Value, xv.v.chunk, true, maxIDRNodes)
	if err != nil || len(damage) > 0 {
		t.Fatalf("walk: %v %q", err, damage)
	}
	for _, e := range entries {
		if e.index == uint64(pid) {
			return e.slot
		}
	}
	t.Fatalf("pid %d not in the allocator", pid)
	return 0
}

// hideButRunning hides a process from the tasks list and the allocator
// and makes it CPU 1's current task (rq->curr, written in the stopped
// guest): the runqueue view sees it, and through it its thread group.
func hideButRunning(t *testing.T, x *xviewGuest, comm string) {
	victim, _ := x.process(t, comm)
	tv, err := x.k.CrossViewTasks(x.off)
	if err != nil {
		t.Fatal(err)
	}
	curr, ok := tv.Offsets["rq.curr"]
	if !ok {
		t.Fatalf("no rq.curr in %+v", tv.Offsets)
	}
	rqs, _ := x.k.Symbol("runqueues")
	pco, _ := x.k.Symbol("__per_cpu_offset")
	o1, err := x.k.ReadU64(pco + 8)
	if err != nil {
		t.Fatal(err)
	}
	var undos []func()
	defer func() {
		for i := len(undos) - 1; i >= 0; i-- {
			undos[i]()
		}
	}()
	undos = append(undos, x.write64(t, x.pidSlot(t, victim.PID), 0))
	undos = append(undos, x.unlink(t, victim.Task+uint64(x.off.TaskTasks.Value)))
	undos = append(undos, x.write64(t, rqs+o1+uint64(curr.Value), victim.Task))
	tv, err = x.k.CrossViewTasks(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(tv.Hidden) != 1 {
		t.Fatalf("hidden %+v, want pid %d only; views %+v", tv.Hidden, victim.PID, tv.Views)
	}
	h := tv.Hidden[0]
	if h.PID != victim.PID || !slices.Contains(h.SeenBy, ViewRunqueue) || !slices.Contains(h.SeenBy, ViewThreadGroup) ||
		!slices.Contains(h.MissingFrom, ViewTasks) || !slices.Contains(h.MissingFrom, ViewPidIDR) {
		t.Errorf("finding %+v: want pid %d seen by runqueue and thread_group, missing from tasks and pid_idr", h, victim.PID)
	}
	t.Logf("process off the tasks list and the allocator, running on CPU 1, found: %+v", h)
}

// forgeModuleList breaks a prev link of the modules list: Modules returns
// the modules before the break with a *PartialError, and CrossViewModules
// names the ones beyond it.
func forgeModuleList(t *testing.T, x *xviewGuest) {
	ms, err := x.k.Modules(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) < 3 {
		t.Fatalf("%d modules loaded, want >= 3", len(ms))
	}
	lo := uint64(x.off.ModuleList.Value)
	undo := x.write64(t, ms[1].Addr+lo+8, ms[1].Addr+lo+0x40)
	defer undo()
	got, err := x.k.Modules(x.off)
	var pe *PartialError
	if !errors.As(err, &pe) || len(got) != 1 || got[0].Name != ms[0].Name || !strings.Contains(err.Error(), "prev is") {
		t.Fatalf("Modules on a forged list: %+v, %v; want %s and a *PartialError", got, err, ms[0].Name)
	}
	mv, err := x.k.CrossViewModules(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if v := viewByName(mv.Views, ViewModules); !v.Ran || v.Count != 1 || !strings.Contains(v.Reason, "damaged") {
		t.Errorf("modules view %+v", v)
	}
	names := map[string]bool{}
	for _, h := range mv.Hidden {
		names[h.Name] = true
	}
	for _, m := range ms[1:] {
		if !names[m.Name] {
			t.Errorf("module %s beyond the break not named; hidden %+v", m.Name, mv.Hidden)
		}
	}
	t.Logf("forged modules list: %d of %d modules, %v; %d named beyond the break", len(got), len(ms), pe, len(mv.Hidden))
}

// hideModuleDeep hides a module as list_del and kobject_del would: off the
// modules list and off module_kset's list, its own links poisoned. Only
// the carve still sees it.
func hideModuleDeep(t *testing.T, x *xviewGuest) {
	ms, err := x.k.Modules(x.off)
	if err != nil {
		t.Fatal(err)
	}
	mv, err := x.k.CrossViewModules(x.off)
	if err != nil {
		t.Fatal(err)
	}
	self, ok1 := mv.Offsets["module.mkobj.mod"]
	mod, ok2 := mv.Offsets["module_kobject.mod"]
	entry, ok3 := mv.Offsets["kobject.entry"]
	if !ok1 || !ok2 || !ok3 {
		t.Fatalf("offsets %+v lack module.mkobj.mod, module_kobject.mod or kobject.entry", mv.Offsets)
	}
	victim := ms[len(ms)-1]
	node := victim.Addr + uint64(x.off.ModuleList.Value)
	kentry := victim.Addr + uint64(self.Value-mod.Value+entry.Value)
	var undos []func()
	defer func() {
		for i := len(undos) - 1; i >= 0; i-- {
			undos[i]()
		}
	}()
	for _, n := range []uint64{node, kentry} {
		undos = append(undos, x.unlink(t, n), x.write64(t, n, listPoison1), x.write64(t, n+8, listPoison2))
	}
	mv, err = x.k.CrossViewModules(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(mv.Hidden) != 1 {
		t.Fatalf("hidden %+v, want %s; views %+v", mv.Hidden, victim.Name, mv.Views)
	}
	h := mv.Hidden[0]
	if h.Name != victim.Name || h.Addr != victim.Addr || len(h.SeenBy) != 1 || h.SeenBy[0] != ViewModuleCarve ||
		!slices.Contains(h.MissingFrom, ViewModules) || !slices.Contains(h.MissingFrom, ViewModuleKset) {
		t.Errorf("finding %+v, want %s seen by module_carve only", h, victim.Name)
	}
	if v := viewByName(mv.Views, ViewModuleKset); v.Count != len(ms)-1 {
		t.Errorf("module_kset view %+v, want %d", v, len(ms)-1)
	}
	t.Logf("module off both lists, links poisoned, carved: %+v", h)
}

// hideExiting hides a process that is exiting (PF_EXITING set): it may
// be missing from a view while it exits, so it is a warning, not a
// finding.
func hideExiting(t *testing.T, x *xviewGuest, comm string) {
	victim, _ := x.process(t, comm)
	fa := victim.Task + uint64(x.off.TaskFlags.Value)
	old, err := x.k.ReadU64(fa)
	if err != nil {
		t.Fatal(err)
	}
	u1 := x.write64(t, fa, old|pfExiting)
	defer u1()
	u2 := x.unlink(t, victim.Task+uint64(x.off.TaskTasks.Value))
	defer u2()
	tv, err := x.k.CrossViewTasks(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(tv.Hidden) != 0 {
		t.Errorf("exiting task reported hidden: %+v", tv.Hidden)
	}
	warned := false
	for _, w := range tv.Warnings {
		warned = warned || strings.Contains(w, comm) && strings.Contains(w, "exiting")
	}
	if !warned {
		t.Errorf("no warning names the exiting task: %q", tv.Warnings)
	}
	t.Logf("exiting task: warnings %q", tv.Warnings)
}

// hideThread unlinks one thread of a multi-threaded process from its
// group's thread list: Processes with threads no longer lists it, the
// allocator still holds it.
func hideThread(t *testing.T, x *xviewGuest, comm string) {
	all, err := x.k.Processes(x.off, ProcessOptions{NoCmdline: true, Threads: true})
	if err != nil {
		t.Fatal(err)
	}
	var victim *Process
	for i := range all {
		if all[i].Comm == comm && all[i].PID != all[i].TGID {
			victim = &all[i]
		}
	}
	if victim == nil {
		t.Fatalf("no thread of %q", comm)
	}
	undo := x.unlink(t, victim.Task+uint64(x.off.TaskThreadNode.Value))
	defer undo()
	after, err := x.k.Processes(x.off, ProcessOptions{NoCmdline: true, Threads: true})
	if err != nil || len(after) != len(all)-1 {
		t.Fatalf("Processes with threads after unlinking thread %d: %d of %d, %v", victim.PID, len(after), len(all), err)
	}
	tv, err := x.k.CrossViewTasks(x.off)
	if err != nil {
		t.Fatal(err)
	}
	if len(tv.Hidden) != 1 {
		t.Fatalf("hidden %+v, want thread %d only", tv.Hidden, victim.PID)
	}
	h := tv.Hidden[0]
	if h.PID != victim.PID || h.TGID != victim.TGID || !slices.Contains(h.SeenBy, ViewPidIDR) ||
		!slices.Contains(h.MissingFrom, ViewTasks) || !slices.Contains(h.MissingFrom, ViewThreadGroup) {
		t.Errorf("finding %+v: want thread %d seen by pid_idr, missing from tasks and thread_group", h, victim.PID)
	}
	t.Logf("thread off its group's list found: %+v", h)
}

// checkRunning runs the cross-views on the guest while it runs: it idles,
// so nothing may be reported hidden (races are warnings at most).
func checkRunning(t *testing.T, x *xviewGuest) {
	if _, err := x.g.QMP("cont", nil); err != nil {
		t.Fatal(err)
	}
	defer x.g.QMP("stop", nil)
	for i := range 5 {
		k := x.k.On(x.mem)
		tv, err := k.CrossViewTasks(x.off)
		if err != nil {
			t.Fatal(err)
		}
		mv, err := k.CrossViewModules(x.off)
		if err != nil {
			t.Fatal(err)
		}
		if len(tv.Hidden) > 0 || len(mv.Hidden) > 0 {
			t.Errorf("run %d on the running guest: hidden %+v %+v", i, tv.Hidden, mv.Hidden)
		}
		if len(tv.Warnings)+len(mv.Warnings) > 0 {
			t.Logf("run %d: warnings %q %q", i, tv.Warnings, mv.Warnings)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestCrossViewDebian612 runs the cross-views on Debian's 6.12 kernel
// (struct pid with pidfs members, module.mem[]), with BTF and without.
// The fetched modules are 6.1's: none loads.
func TestCrossViewDebian612(t *testing.T) {
	kernel := func(p testlinux.Paths) string { return filepath.Join(p.Dir, "debian-6.12", "vmlinuz") }
	_, err := os.Stat(kernel(testlinux.Require(t)))
	testenv.Check(t, testenv.Guests, err)
	x := bootXView(t, kernel, false)
	t.Run("CleanTasks", func(t *testing.T) { checkCleanTasks(t, x.k, x.off) })
	t.Run("CleanModules", func(t *testing.T) { checkCleanModules(t, x.k, x.off, true) })
	t.Run("HideProcess", func(t *testing.T) { hideProcess(t, x, "kvm-odd_name.x") })
	t.Run("HideThread", func(t *testing.T) { hideThread(t, x, "kvm-threads") })
	t.Run("HideFromPidIDR", func(t *testing.T) { hideFromIDR(t, x, "kvm-odd_name.x") })
	t.Run("HideButRunning", func(t *testing.T) { hideButRunning(t, x, "kvm-odd_name.x") })
	t.Run("ForgedTaskList", func(t *testing.T) { forgeTaskList(t, x) })
	t.Run("SolvedOffsets", func(t *testing.T) {
		nb := *x.k
		nb.BTF = nil
		off, err := SolveOffsets(&nb)
		if off == nil {
			t.Fatal(err)
		}
		checkCleanTasks(t, &nb, off)
		checkCleanModules(t, &nb, off, false)
		y := *x
		y.k, y.off = &nb, off
		t.Run("HideButRunning", func(t *testing.T) { hideButRunning(t, &y, "kvm-odd_name.x") })
	})
}
