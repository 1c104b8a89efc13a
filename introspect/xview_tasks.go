package introspect

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// A ViewResult is one way of enumerating kernel objects: whether it ran,
// how many objects it saw, and why it did not run or the damage it met.
type ViewResult struct {
	// Name is "tasks", "pid_idr", "runqueue", "thread_group" (tasks);
	// "modules", "module_kset", "module_carve" (modules).
	Name   string `json:"name"`
	Ran    bool   `json:"ran"`
	Count  int    `json:"count"`
	Reason string `json:"reason,omitempty"`
}

// HiddenTask is a task some view sees that the tasks list (or, alive,
// the PID allocator) does not hold.
type HiddenTask struct {
	PID         int      `json:"pid"`
	TGID        int      `json:"tgid"`
	Comm        string   `json:"comm"`
	Task        uint64   `json:"task"`
	SeenBy      []string `json:"seen_by"`
	MissingFrom []string `json:"missing_from"`
}

// TaskViews is the result of CrossViewTasks.
type TaskViews struct {
	Views    []ViewResult `json:"views"`
	Hidden   []HiddenTask `json:"hidden"`
	Warnings []string     `json:"warnings,omitempty"`
	// Offsets are the members the views used beyond Offsets, by kernel
	// name, with where each came from (BTF, or solved and how).
	Offsets map[string]Offset `json:"offsets,omitempty"`
}

// View names.
const (
	ViewTasks       = "tasks"
	ViewPidIDR      = "pid_idr"
	ViewRunqueue    = "runqueue"
	ViewThreadGroup = "thread_group"
)

// Task flag and state bits (include/linux/sched.h).
const (
	pfExiting  = 0x00000004
	taskDead   = 0x80
	exitZombie = 0x20
	exitDead   = 0x10
)

// Bounds of the cross-views.
const (
	maxIDRNodes = 1 << 14 // radix-tree nodes of the PID allocator
	maxCPUs     = 8192    // NR_CPUS of the largest x86-64 configurations
	rqWindow    = 0x3000  // bytes of struct rq searched for idle (6.1: curr at 0x9a0; 7.x larger)
)

// taskInfo is what the cross-views read of one task.
type taskInfo struct {
	addr        uint64
	pid, tgid   int
	comm        string
	flags       uint32
	state       uint32
	exitState   uint32
	haveFlags   bool
	signal      uint64
	ok          bool // its bytes could be read
	readErr     error
	threadsHead uint64
}

func (t *taskInfo) exiting() bool {
	return t.haveFlags && t.flags&pfExiting != 0 || t.state&taskDead != 0 || t.exitState&(exitZombie|exitDead) != 0
}

// idle reports whether t is one of the idle tasks: pid 0, PF_IDLE, named
// swapper/N and, when the runqueue view read them, some CPU's rq->idle.
func (x *xview) idle(t *taskInfo) bool {
	if t.pid != 0 || t.haveFlags && t.flags&pfIdle == 0 || !strings.HasPrefix(t.comm, "swapper") {
		return false
	}
	return x.idles == nil || x.idles[t.addr]
}

// xview is the state of one CrossViewTasks.
type xview struct {
	k     *Kernel
	off   *Offsets
	r     *taskReader
	v     viewOffsets
	infos map[uint64]*taskInfo
	warn  []string
	// budget bounds the list nodes walked over all thread groups.
	budget int
	// idles are the CPUs' idle tasks (rq->idle), when read.
	idles map[uint64]bool
}

func (x *xview) warnf(format string, args ...any) {
	x.warn = append(x.warn, fmt.Sprintf(format, args...))
}

// info reads (once) the members of the task at addr.
func (x *xview) info(addr uint64) *taskInfo {
	if t, ok := x.infos[addr]; ok {
		return t
	}
	t := &taskInfo{addr: addr, pid: -1, tgid: -1}
	x.infos[addr] = t
	if len(x.infos) > 4*maxTasks {
		t.readErr = errors.New("too many tasks")
		return t
	}
	b, err := x.r.readInto(make([]byte, x.r.hi-x.r.lo), addr)
	if err != nil {
		t.readErr = err
		return t
	}
	p := x.r.process(addr, b, 0)
	t.ok, t.pid, t.tgid, t.comm = true, p.PID, p.TGID, p.Comm
	if v, ok := x.r.field(b, x.off.TaskFlags, 4); ok {
		t.flags, t.haveFlags = uint32(v), true
	}
	if v, ok := x.r.field(b, x.off.TaskState, 4); ok {
		t.state = uint32(v)
	}
	if x.v.exitState.Known() {
		if v, err := x.k.ReadU32(addr + uint64(x.v.exitState.Value)); err == nil {
			t.exitState = v
		}
	}
	if v, ok := x.r.field(b, x.off.TaskSignal, 8); ok && x.off.SignalThreadHd.Known() {
		t.signal = v
		t.threadsHead = v + uint64(x.off.SignalThreadHd.Value)
	}
	return t
}

// CrossViewTasks enumerates the guest's tasks four ways and names the
// tasks that one view sees and the tasks list does not:
//
//   - tasks: init_task.tasks, the list Processes walks (thread-group
//     leaders; for_each_process).
//   - thread_group: every thread on the thread list (signal->thread_head,
//     task->thread_node) of every thread group a view knows of.
//   - pid_idr: the PID allocator, init_pid_ns.idr (a radix tree since
//     4.15, an xarray since 4.20): each entry is a struct pid whose
//     tasks[PIDTYPE_PID] holds the task (task->pid_links[PIDTYPE_PID]);
//     numbers[0].nr must equal the entry's index.
//   - runqueue: rq->curr of every online CPU (per-CPU runqueues at
//     __per_cpu_offset[cpu]), the task that runs there.
//
// The tasks list, with the threads on the thread lists of its leaders, is
// what Processes lists ("listed"). A finding is a task that is
//
//   - seen by pid_idr, runqueue or thread_group and not listed
//     (MissingFrom says "tasks", and each other view lacking it), or
//   - listed and alive but not in pid_idr (MissingFrom "pid_idr"), when
//     pid_idr ran.
//
// A task missing from runqueue is never a finding: a CPU runs one task,
// and most tasks sleep. The idle tasks (pid 0, PF_IDLE, one per CPU) are
// on no list and in no allocator by design, and are never findings.
// Exiting tasks (PF_EXITING, TASK_DEAD, EXIT_ZOMBIE/EXIT_DEAD) leave the
// lists and the allocator in steps (exit_notify, release_task); one
// missing from a view is not a finding but a warning saying so.
//
// On a guest that runs while it is read, a task forked between the walks
// would be in the allocator and not on the list: the tasks list is walked
// again at the end, and such a task is dropped with a warning. Pause the
// guest for a consistent view.
//
// Each view runs on its own: one whose symbols or offsets cannot be found
// is reported with Ran false and the reason, and a damaged tasks list (see
// PartialError) is reported in its Reason; the other views then name the
// tasks beyond the break. The error is non-nil only when nothing can be
// read at all (no init_task, or no tasks/comm/pid offsets).
func (k *Kernel) CrossViewTasks(off *Offsets) (*TaskViews, error) {
	initTask, ok := k.Symbol("init_task")
	if !ok {
		return nil, fmt.Errorf("cross-view tasks: kallsyms has no init_task: %w", ErrNotFound)
	}
	for _, m := range []Offset{off.TaskTasks, off.TaskComm, off.TaskPID} {
		if !m.Known() {
			return nil, fmt.Errorf("cross-view tasks: tasks, comm and pid: %w", ErrOffsetsMissing)
		}
	}
	return crossViewTasks(k, off, initTask)
}

// taskSet is the tasks one view saw, in the order it saw them.
type taskSet struct {
	order []uint64
	has   map[uint64]bool
}

func newTaskSet() *taskSet { return &taskSet{has: map[uint64]bool{}} }

func (s *taskSet) add(t uint64) {
	if !s.has[t] {
		s.has[t] = true
		s.order = append(s.order, t)
	}
}

func crossViewTasks(k *Kernel, off *Offsets, initTask uint64) (*TaskViews, error) {
	x := &xview{k: k, off: off, r: newTaskReader(k, off), infos: map[uint64]*taskInfo{}, budget: 2 * maxTasks}
	if k.BTF != nil {
		if o, err := k.btfOffset("task_struct", "exit_state"); err == nil {
			x.v.exitState = o
		}
	}
	res := &TaskViews{Hidden: []HiddenTask{}}

	// tasks: the leaders on init_task.tasks.
	tasksView := ViewResult{Name: ViewTasks, Ran: true}
	leaders := newTaskSet()
	leaders.add(initTask)
	lo := uint64(off.TaskTasks.Value)
	nodes, damage, err := walkList(k, initTask+lo, maxTasks, nil)
	if err != nil {
		return nil, fmt.Errorf("cross-view tasks: %w", err)
	}
	for _, n := range nodes {
		leaders.add(n - lo)
	}
	if damage != "" {
		tasksView.Reason = "damaged: " + damage
		x.warnf("tasks list damaged (%s): tasks the other views see beyond the break are reported as hidden", damage)
	}
	tasksView.Count = len(leaders.order)

	// thread_group: the threads of each listed leader; these and the
	// leaders are what Processes lists.
	threadsKnown := off.TaskSignal.Known() && off.TaskThreadNode.Known() && off.SignalThreadHd.Known()
	tgView := ViewResult{Name: ViewThreadGroup, Ran: threadsKnown}
	if !threadsKnown {
		tgView.Reason = "task_struct.signal, task_struct.thread_node or signal_struct.thread_head unknown: " + ErrOffsetsMissing.Error()
	}
	tg := newTaskSet()
	listed := newTaskSet()
	walked := map[uint64]bool{} // thread-list heads walked
	var tgDamage []string
	walkGroup := func(t *taskInfo) {
		if !threadsKnown || !t.ok || t.threadsHead == 0 || walked[t.threadsHead] {
			return
		}
		walked[t.threadsHead] = true
		ns, damage, err := walkList(k, t.threadsHead, maxTasks, &x.budget)
		if err != nil {
			damage = err.Error()
		}
		if damage != "" && len(tgDamage) < 16 {
			tgDamage = append(tgDamage, fmt.Sprintf("threads of pid %d: %s", t.pid, damage))
		}
		for _, n := range ns {
			th := n - uint64(off.TaskThreadNode.Value)
			if ti := x.info(th); !ti.ok {
				if len(tgDamage) < 16 {
					tgDamage = append(tgDamage, fmt.Sprintf("threads of pid %d: task at %#x: %v", t.pid, th, ti.readErr))
				}
				continue
			}
			tg.add(th)
		}
	}
	for _, l := range leaders.order {
		listed.add(l)
		t := x.info(l)
		if !t.ok {
			x.warnf("task at %#x on the tasks list: %v", l, t.readErr)
			continue
		}
		walkGroup(t)
	}
	for _, t := range tg.order {
		listed.add(t)
	}

	// pid_idr.
	idrView, idr := x.pidIDR(listed)
	// runqueue.
	rqView, rq := x.runqueues(listed, idr)

	// The thread groups of the tasks the other views see that are not
	// listed: their threads are then seen by thread_group.
	for _, set := range []*taskSet{idr, rq} {
		if set == nil {
			continue
		}
		for _, a := range set.order {
			// The idle tasks of the other CPUs (pid 0) are groups of
			// their own, on no list: not walked, never findings.
			if t := x.info(a); !listed.has[a] && !x.idle(t) {
				walkGroup(t)
			}
		}
	}
	tgView.Count = len(tg.order)
	if len(tgDamage) > 0 {
		tgView.Reason = "damaged: " + strings.Join(tgDamage, "; ")
	}
	res.Views = []ViewResult{tasksView, idrView, rqView, tgView}

	// Findings.
	views := []struct {
		name string
		set  *taskSet
	}{{ViewTasks, listed}, {ViewPidIDR, idr}, {ViewRunqueue, rq}, {ViewThreadGroup, tg}}
	if !threadsKnown {
		views[3].set = nil
	}
	reported := map[uint64]bool{}
	report := func(a uint64, seenBy []string) {
		if reported[a] {
			return
		}
		reported[a] = true
		t := x.info(a)
		var missing []string
		for _, v := range views {
			if v.set != nil && !v.set.has[a] && v.name != ViewRunqueue {
				missing = append(missing, v.name)
			}
		}
		if x.idle(t) {
			return
		}
		if t.exiting() {
			x.warnf("task %d %q at %#x is exiting: seen by %s, missing from %s (not a finding)",
				t.pid, t.comm, a, strings.Join(seenBy, ","), strings.Join(missing, ","))
			return
		}
		res.Hidden = append(res.Hidden, HiddenTask{PID: t.pid, TGID: t.tgid, Comm: t.comm, Task: a,
			SeenBy: seenBy, MissingFrom: missing})
	}
	seenBy := func(a uint64) []string {
		var s []string
		for _, v := range views {
			if v.set != nil && v.set.has[a] {
				s = append(s, v.name)
			}
		}
		return s
	}
	for _, v := range views[1:] {
		if v.set == nil {
			continue
		}
		for _, a := range v.set.order {
			if !listed.has[a] {
				report(a, seenBy(a))
			}
		}
	}
	if idr != nil {
		for _, a := range listed.order {
			if a == initTask || idr.has[a] {
				continue
			}
			if t := x.info(a); t.ok && !x.idle(t) {
				report(a, seenBy(a))
			}
		}
	}
	res.Hidden = x.recheck(res.Hidden, initTask)
	sort.Slice(res.Hidden, func(i, j int) bool { return res.Hidden[i].PID < res.Hidden[j].PID })
	res.Warnings = x.warn
	res.Offsets = x.v.members()
	return res, nil
}

// recheck walks the tasks list once more: on a guest that runs while it
// is read, a task forked after the first walk is in the allocator but was
// not on the list then. A finding missing from tasks whose task (or whose
// thread group) is on the list now is dropped with a warning.
func (x *xview) recheck(hidden []HiddenTask, initTask uint64) []HiddenTask {
	var missing []int
	for i, h := range hidden {
		if hasName(h.MissingFrom, ViewTasks) {
			missing = append(missing, i)
		}
	}
	if len(missing) == 0 {
		return hidden
	}
	lo := uint64(x.off.TaskTasks.Value)
	nodes, _, err := walkList(x.k, initTask+lo, maxTasks, nil)
	if err != nil {
		return hidden
	}
	now := map[uint64]bool{initTask: true}
	heads := map[uint64]bool{}
	for _, n := range nodes {
		now[n-lo] = true
	}
	// Thread-list heads of the leaders now listed, read only for the
	// groups of the findings (the others are cached or not needed).
	want := map[uint64]bool{}
	for _, i := range missing {
		if t := x.info(hidden[i].Task); t.threadsHead != 0 {
			want[t.threadsHead] = true
		}
	}
	for a := range now {
		if t := x.info(a); t.threadsHead != 0 && want[t.threadsHead] {
			heads[t.threadsHead] = true
		}
	}
	// The members of those groups, walked again.
	members := map[uint64]bool{}
	for h := range heads {
		ns, _, _ := walkList(x.k, h, maxTasks, &x.budget)
		for _, n := range ns {
			members[n-uint64(x.off.TaskThreadNode.Value)] = true
		}
	}
	drop := map[int]bool{}
	for _, i := range missing {
		h := hidden[i]
		if now[h.Task] || members[h.Task] {
			drop[i] = true
			x.warnf("task %d %q at %#x was not on the tasks list but is now: created while the guest ran (not a finding; pause the guest for a consistent view)", h.PID, h.Comm, h.Task)
		}
	}
	if len(drop) == 0 {
		return hidden
	}
	out := hidden[:0:0]
	for i, h := range hidden {
		if !drop[i] {
			out = append(out, h)
		}
	}
	return out
}

func hasName(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
