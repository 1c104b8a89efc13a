package introspect

import (
	"fmt"
	"strings"
)

// onlineCPUs returns the online CPUs: 0..nr_cpu_ids-1 that are set in
// __cpu_online_mask (all of them when kallsyms lacks the mask).
func (k *Kernel) onlineCPUs() ([]int, error) {
	nrSym, ok := k.Symbol("nr_cpu_ids")
	if !ok {
		return nil, fmt.Errorf("kallsyms has no nr_cpu_ids")
	}
	n, err := k.ReadU32(nrSym)
	if err != nil {
		return nil, fmt.Errorf("nr_cpu_ids: %w", err)
	}
	if n == 0 || n > maxCPUs {
		return nil, fmt.Errorf("nr_cpu_ids is %d", n)
	}
	mask := make([]byte, (n+63)/64*8)
	haveMask := false
	if m, ok := k.Symbol("__cpu_online_mask"); ok && k.ReadVirt(mask, m) == nil {
		haveMask = true
	}
	var cpus []int
	for c := 0; c < int(n); c++ {
		if !haveMask || mask[c/8]&(1<<(c%8)) != 0 {
			cpus = append(cpus, c)
		}
	}
	if len(cpus) == 0 {
		return nil, fmt.Errorf("__cpu_online_mask has no CPU online")
	}
	return cpus, nil
}

// runqueues runs the runqueue view: rq->curr of every online CPU and,
// with BTF, the CFS tasks queued on it (rq->cfs_tasks).
// listed and idr (nil when that view did not run) are the tasks the other
// views found, used to solve rq->curr without BTF.
func (x *xview) runqueues(listed, idr *taskSet) (ViewResult, *taskSet) {
	vr := ViewResult{Name: ViewRunqueue}
	k := x.k
	rqSym, ok1 := k.Symbol("runqueues")
	pco, ok2 := k.Symbol("__per_cpu_offset")
	if !ok1 || !ok2 {
		vr.Reason = "kallsyms has no runqueues or __per_cpu_offset (a kernel without CONFIG_KALLSYMS_ALL)"
		return vr, nil
	}
	cpus, err := k.onlineCPUs()
	if err != nil {
		vr.Reason = err.Error()
		return vr, nil
	}
	rqs := make([]uint64, len(cpus))
	for i, c := range cpus {
		o, err := k.ReadU64(pco + 8*uint64(c))
		if err != nil {
			vr.Reason = fmt.Sprintf("__per_cpu_offset[%d]: %v", c, err)
			return vr, nil
		}
		rqs[i] = rqSym + o
	}
	if k.BTF != nil {
		var err1, err2 error
		x.v.rqCurr, err1 = k.btfOffset("rq", "curr")
		x.v.rqIdle, err2 = k.btfOffset("rq", "idle")
		if err1 != nil || err2 != nil {
			vr.Reason = fmt.Sprintf("offsets: %v %v", err1, err2)
			return vr, nil
		}
	} else if err := x.solveRq(cpus, rqs, listed, idr); err != nil {
		vr.Reason = "struct rq layout (no BTF): " + err.Error()
		return vr, nil
	}
	set := newTaskSet()
	var damage []string
	idles := map[uint64]bool{}
	if initTask, ok := k.Symbol("init_task"); ok {
		idles[initTask] = true
	}
	for i := range cpus {
		if v, err := k.ReadU64(rqs[i] + uint64(x.v.rqIdle.Value)); err == nil {
			idles[v] = true
		}
	}
	x.idles = idles
	for i, c := range cpus {
		curr, err := k.ReadU64(rqs[i] + uint64(x.v.rqCurr.Value))
		if err != nil {
			damage = append(damage, fmt.Sprintf("cpu %d: rq->curr: %v", c, err))
			continue
		}
		if !k.kernelPtr(curr) {
			damage = append(damage, fmt.Sprintf("cpu %d: rq->curr %#x is not a kernel address", c, curr))
			continue
		}
		if t := x.info(curr); !t.ok {
			damage = append(damage, fmt.Sprintf("cpu %d: rq->curr %#x: %v", c, curr, t.readErr))
			continue
		}
		set.add(curr)
	}
	// With BTF, the CFS tasks queued on each CPU too: rq->cfs_tasks,
	// linked through task->se.group_node (every runnable CFS task of the
	// rq, the running one included).
	if k.BTF != nil {
		cfs, err1 := k.btfOffset("rq", "cfs_tasks")
		se, err2 := k.btfOffset("task_struct", "se.group_node")
		if err1 == nil && err2 == nil {
			x.v.rqCFSTasks, x.v.seGroupNode = cfs, se
			budget := maxTasks
			for i, c := range cpus {
				nodes, d, err := walkList(k, rqs[i]+uint64(cfs.Value), maxTasks, &budget)
				if err != nil {
					d = err.Error()
				}
				if d != "" {
					damage = append(damage, fmt.Sprintf("cpu %d: rq->cfs_tasks: %s", c, d))
				}
				for _, n := range nodes {
					t := n - uint64(se.Value)
					if x.info(t).ok {
						set.add(t)
					}
				}
			}
		}
	}
	vr.Ran, vr.Count = true, len(set.order)
	if len(damage) > 0 {
		vr.Reason = "damaged: " + strings.Join(damage, "; ")
	}
	return vr, set
}

// solveRq finds rq->idle and rq->curr without BTF. idle: the offset that
// holds init_task in CPU 0's rq and, in every other CPU's, a pid-0 task
// named swapper/N for its CPU N; followed by rq->stop, the CPU's stopper
// thread migration/N (declaration order curr, idle, stop since 2.6.37;
// 6.15 put dl_server between curr and idle; in 7.x curr and idle are at
// the head of struct rq, stop elsewhere: then, when curr holds the idle
// task too, the later of the two). curr: the nearest pointer
// before idle that, on every CPU, leads to that CPU's idle task, to a
// task the other views know, or to a task_struct by its own structure
// (looksLikeTask: a task hidden from every list may be the one running;
// a guest stopped while idle runs its idle tasks; donor, with proxy
// execution, comes before curr).
func (x *xview) solveRq(cpus []int, rqs []uint64, listed, idr *taskSet) error {
	k := x.k
	initTask, _ := k.Symbol("init_task")
	imgs := make([][]byte, len(rqs))
	win := rqWindow
	for i, a := range rqs {
		b, err := readUpTo(k, a, rqWindow)
		if err != nil {
			return fmt.Errorf("cpu %d: rq at %#x: %v", cpus[i], a, err)
		}
		imgs[i] = b
		win = min(win, len(b))
	}
	named := func(v uint64, name string) bool {
		if !k.kernelPtr(v) {
			return false
		}
		t := x.info(v)
		return t.ok && t.comm == name
	}
	try := func(stop bool) []candidate {
		var cands []candidate
		for o := 0; o+16 <= win; o += 8 {
			if le64(imgs[0], o) != initTask {
				continue
			}
			ok := true
			for i, c := range cpus {
				v := le64(imgs[i], o)
				if i > 0 && (!named(v, fmt.Sprintf("swapper/%d", c)) || x.info(v).pid != 0) {
					ok = false
					break
				}
				if stop && !named(le64(imgs[i], o+8), fmt.Sprintf("migration/%d", c)) {
					ok = false
					break
				}
			}
			if ok {
				cands = append(cands, candidate{off: o})
			}
		}
		return cands
	}
	how := "holds init_task in CPU 0's rq and swapper/N (pid 0) in CPU N's; rq->stop (migration/N) follows it"
	cands := try(true)
	if len(cands) == 0 {
		cands = try(false)
		how = "holds init_task in CPU 0's rq and swapper/N (pid 0) in CPU N's (no stopper thread after it, as in 6.x)"
		// Every CPU idles (a stopped idle guest): rq->curr holds
		// the idle task too. curr is declared before idle in every
		// layout (7.x moved both to the head of struct rq, with stop
		// elsewhere), so of two such the later is idle.
		if len(cands) == 2 && cands[1].off == cands[0].off+8 {
			cands = cands[1:]
			how += "; of the two offsets holding the idle tasks (curr and idle on CPUs that idle), the later (curr is declared first)"
		}
	}
	ic, err := one("rq.idle", cands)
	if err != nil {
		return err
	}
	known := func(v uint64, i int) bool {
		return v == le64(imgs[i], ic.off) || listed.has[v] || idr != nil && idr.has[v] || x.looksLikeTask(v)
	}
	for o := ic.off - 8; o >= max(0, ic.off-32); o -= 8 {
		ok := true
		for i := range cpus {
			if !known(le64(imgs[i], o), i) {
				ok = false
				break
			}
		}
		if ok {
			x.v.rqIdle = solved(ic.off, how)
			x.v.rqCurr = solved(o, "nearest pointer before rq->idle leading, on every CPU, to its idle task, a task the tasks list or the PID allocator holds, or a task_struct by structure (name, pid, on its own thread list)")
			return nil
		}
	}
	return fmt.Errorf("rq.curr: no pointer in the 32 bytes before rq->idle (%#x) leads to a task on every CPU", ic.off)
}

// looksLikeTask reports whether a is a task_struct by its own members: a
// name, a pid in range, and a thread list (signal->thread_head) that is
// whole and holds a.
func (x *xview) looksLikeTask(a uint64) bool {
	if !x.k.kernelPtr(a) || !x.off.TaskThreadNode.Known() {
		return false
	}
	t := x.info(a)
	if !t.ok || t.pid <= 0 || t.pid > pidMax || len(t.comm) == 0 || len(t.comm) > 15 || t.threadsHead == 0 {
		return false
	}
	nodes, damage, err := walkList(x.k, t.threadsHead, 1<<12, &x.budget)
	if err != nil || damage != "" {
		return false
	}
	for _, n := range nodes {
		if n-uint64(x.off.TaskThreadNode.Value) == a {
			return true
		}
	}
	return false
}
