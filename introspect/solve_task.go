package introspect

import (
	"bytes"
	"errors"
	"fmt"
)

// solveComm finds task_struct.comm: init_task is the boot CPU's idle task,
// named "swapper/0" by init_idle() ("swapper" before 3.x renamed it),
// zero-padded to 16 bytes.
func (s *solver) solveComm() error {
	var cands []candidate
	for _, name := range []string{"swapper/0", "swapper"} {
		pat := make([]byte, 16)
		copy(pat, name)
		for i := 0; i+16 <= len(s.init.b); i++ {
			if bytes.Equal(s.init.b[i:i+16], pat) {
				cands = append(cands, candidate{off: i})
			}
		}
		if len(cands) > 0 {
			c, err := one("task_struct.comm", cands)
			if err != nil {
				return err
			}
			s.off.TaskComm = solved(c.off, fmt.Sprintf("init_task holds %q zero-padded to 16 bytes there", name))
			return nil
		}
	}
	return fmt.Errorf(`no "swapper/0" or "swapper" in the first %d bytes of init_task`, len(s.init.b))
}

// solveTasks finds task_struct.tasks: a list_head in init_task that is the
// head of a circular list, consistent both ways, of at least two nodes
// that all sit at that same offset in a task_struct whose comm (at the
// comm offset) is a task name.
func (s *solver) solveTasks() error {
	comm := int(s.off.TaskComm.Value)
	type found struct {
		off   int
		nodes []uint64
		bad   int
	}
	var ok []found
	var cands []candidate
	for o := 0; o+16 <= len(s.init.b); o += 8 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return err
		}
		head := s.init.base + uint64(o)
		next, prev := le64(s.init.b, o), le64(s.init.b, o+8)
		if next == head || !s.k.kernelPtr(next) || !s.k.kernelPtr(prev) {
			continue
		}
		// Cheap checks on init_task before walking.
		if p, err := s.k.ReadU64(next + 8); err != nil || p != head {
			continue
		}
		if n, err := s.k.ReadU64(prev); err != nil || n != head {
			continue
		}
		nodes, err := s.list(head, maxTasks)
		if errors.Is(err, ErrBudget) {
			return err
		}
		if err != nil || len(nodes) < 2 {
			continue
		}
		// Every node must be a task: a name at the comm offset. A few
		// tasks may have renamed themselves to non-ASCII names.
		if err := s.spend(len(nodes)); err != nil {
			return err
		}
		bad := 0
		for _, n := range nodes {
			var b [16]byte
			if err := s.k.ReadVirt(b[:], n-uint64(o)+uint64(comm)); err != nil {
				bad = len(nodes)
				break
			}
			_, valid, printable := validComm(b[:])
			if !valid {
				bad = len(nodes)
				break
			}
			if !printable {
				bad++
			}
		}
		if bad*10 > len(nodes) {
			continue
		}
		ok = append(ok, found{o, nodes, bad})
		cands = append(cands, candidate{off: o})
	}
	c, err := one("task_struct.tasks", cands)
	if err != nil {
		return err
	}
	var f found
	for _, x := range ok {
		if x.off == c.off {
			f = x
		}
	}
	s.tasks = append(s.tasks, s.init)
	s.byBase[s.init.base] = s.init
	for _, n := range f.nodes {
		base := n - uint64(f.off)
		b, err := s.read(base, taskWindow)
		if err != nil {
			return fmt.Errorf("read task_struct at %#x: %w", base, err)
		}
		t := &taskImage{base: base, b: b}
		s.tasks = append(s.tasks, t)
		s.byBase[base] = t
	}
	s.off.TaskTasks = solved(f.off, fmt.Sprintf(
		"the only list_head in init_task heading a consistent circular list of task_structs (%d nodes with names at comm)", len(f.nodes)))
	return nil
}

// solveThreads finds task_struct.thread_node, task_struct.signal and
// signal_struct.thread_head (Linux 3.14+): every thread is on the list
// headed by its signal_struct's thread_head. For a single-threaded task
// (init_task is one) that list has exactly two entries, the task's node
// and the head, and the head sits at one fixed offset from the address in
// the task's signal pointer. Threads other than group leaders are not on
// the tasks list; this list is how they are found.
func (s *solver) solveThreads() error {
	type trip struct{ t, sig, head int }
	var trips []trip
	win := s.minWindow()
	for t := 0; t+16 <= win; t += 8 {
		self := s.init.base + uint64(t)
		next, prev := le64(s.init.b, t), le64(s.init.b, t+8)
		if next != prev || next == self || !s.k.kernelPtr(next) {
			continue
		}
		var b [16]byte
		if err := s.k.ReadVirt(b[:], next); err != nil || le64(b[:], 0) != self || le64(b[:], 8) != self {
			continue
		}
		for sig := 0; sig+8 <= win; sig += 8 {
			if err := s.charge(1); err != nil {
				return err
			}
			if sig >= t && sig < t+16 {
				continue // thread_node's own links
			}
			p := le64(s.init.b, sig)
			if !s.k.kernelPtr(p) || next < p || next-p >= signalWindow || (next-p)%8 != 0 {
				continue
			}
			trips = append(trips, trip{t, sig, int(next - p)})
		}
	}
	// Check every candidate on every task; collect the other threads.
	var good []trip
	var goodThreads [][]*taskImage
	for _, tr := range trips {
		threads, ok := s.checkThreads(tr.t, tr.sig, tr.head)
		if ok {
			good = append(good, tr)
			goodThreads = append(goodThreads, threads)
		}
	}
	if len(good) != 1 {
		var c []candidate
		for _, g := range good {
			c = append(c, candidate{off: g.t})
		}
		_, err := one("task_struct.thread_node", c)
		return err
	}
	g := good[0]
	s.threads = goodThreads[0]
	s.off.TaskThreadNode = solved(g.t, "list_head in every task whose circular list holds the task's threads and one head at a fixed offset from its signal pointer")
	s.off.TaskSignal = solved(g.sig, "pointer in every task to the struct holding its thread list's head (same pointer in all threads of a group)")
	s.off.SignalThreadHd = solved(g.head, "offset of the thread list's head from the signal pointer, the same in every task")
	return nil
}

// checkThreads verifies a (thread_node, signal, thread_head) candidate on
// every task and returns the threads that are not group leaders.
func (s *solver) checkThreads(t, sig, head int) ([]*taskImage, bool) {
	if s.charge(len(s.tasks)) != nil {
		return nil, false
	}
	var threads []*taskImage
	total := 0
	for _, task := range s.tasks {
		sp := le64(task.b, sig)
		if !s.k.kernelPtr(sp) {
			return nil, false
		}
		h := sp + uint64(head)
		nodes, err := s.list(h, maxTasks-total)
		if err != nil || len(nodes) == 0 {
			return nil, false
		}
		total += len(nodes)
		self := false
		for _, n := range nodes {
			base := n - uint64(t)
			if base == task.base {
				self = true
				continue
			}
			b, err := s.read(base, taskWindow)
			if err != nil || le64(b, sig) != sp {
				return nil, false
			}
			if s.byBase[base] != nil {
				// A leader on the tasks list in another leader's group.
				return nil, false
			}
			threads = append(threads, &taskImage{base: base, b: b, leader: task})
		}
		if !self {
			return nil, false
		}
	}
	return threads, true
}

// solvePID finds task_struct.pid and task_struct.tgid: 0 in init_task;
// in the other tasks integers from 1 to PID_MAX_LIMIT, distinct, including
// 1 (init) and 2 (kthreadd). With threads, pid differs between the
// threads of a group and tgid equals the leader's pid; without any thread
// the two are equal everywhere and only declaration order (pid first)
// tells them apart.
func (s *solver) solvePID() error {
	var cands []candidate
	for o := 0; o+4 <= s.minWindow(); o += 4 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return err
		}
		if le32(s.init.b, o) != 0 {
			continue
		}
		vals := make([]uint64, 0, len(s.tasks))
		ok, has1, has2 := true, false, false
		for _, t := range s.tasks[1:] {
			v := le32(t.b, o)
			if v == 0 || v > pidMax {
				ok = false
				break
			}
			has1 = has1 || v == 1
			has2 = has2 || v == 2
			vals = append(vals, uint64(v))
		}
		if !ok || !has1 || !has2 || !distinct(vals) {
			continue
		}
		cands = append(cands, candidate{off: o, vals: vals})
	}
	if len(s.threads) > 0 {
		var pids, tgids []candidate
		for _, c := range cands {
			all := append([]uint64(nil), c.vals...)
			sameAsLeader := true
			for _, th := range s.threads {
				v := uint64(le32(th.b, c.off))
				all = append(all, v)
				if v != uint64(le32(th.leader.b, c.off)) {
					sameAsLeader = false
				}
			}
			if distinct(all) {
				pids = append(pids, c)
			}
			if sameAsLeader {
				tgids = append(tgids, c)
			}
		}
		p, err := one("task_struct.pid", pids)
		if err != nil {
			return err
		}
		g, err := one("task_struct.tgid", tgids)
		if err != nil {
			return err
		}
		s.off.TaskPID = solved(p.off, fmt.Sprintf("0 in init_task, distinct small integers over %d tasks and %d threads, 1 and 2 present", len(s.tasks)-1, len(s.threads)))
		s.off.TaskTGID = solved(g.off, "like pid on leaders; in each of the other threads equal to its leader's pid")
		return nil
	}
	p, g, err := twins("task_struct.pid/tgid", cands, 4)
	if err != nil {
		return err
	}
	s.off.TaskPID = solved(p.off, fmt.Sprintf("0 in init_task, distinct integers 1..%d over %d tasks, 1 and 2 present; no threads: equal to tgid everywhere, pid is declared first", pidMax, len(s.tasks)-1))
	s.off.TaskTGID = solved(g.off, "same values as pid (no multi-threaded process to tell them apart); declared right after pid")
	return nil
}

// pidOf is a task's pid (solved).
func (s *solver) pidOf(t *taskImage) uint32 { return le32(t.b, int(s.off.TaskPID.Value)) }

func (s *solver) taskByPID(pid uint32) *taskImage {
	for _, t := range s.tasks {
		if s.pidOf(t) == pid {
			return t
		}
	}
	return nil
}

// solveParent finds task_struct.real_parent and task_struct.parent:
// pointers, in every task, to the base of another task on the list (never
// the task itself), init_task's pointing to itself, and init's (pid 1) and
// kthreadd's (pid 2) to init_task. The two are equal unless a task is
// being traced; then parent is the tracer.
func (s *solver) solveParent() error {
	initP, kthreadd := s.taskByPID(1), s.taskByPID(2)
	if initP == nil || kthreadd == nil {
		return fmt.Errorf("no task with pid 1 or 2")
	}
	var cands []candidate
	for o := 0; o+8 <= s.minWindow(); o += 8 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return err
		}
		if le64(s.init.b, o) != s.init.base || le64(initP.b, o) != s.init.base || le64(kthreadd.b, o) != s.init.base {
			continue
		}
		ok := true
		vals := make([]uint64, 0, len(s.tasks))
		for _, t := range s.tasks[1:] {
			v := le64(t.b, o)
			if v == t.base || s.byBase[v] == nil {
				ok = false
				break
			}
			vals = append(vals, v)
		}
		if ok {
			cands = append(cands, candidate{off: o, vals: vals})
		}
	}
	rp, p, err := twins("task_struct.real_parent/parent", cands, 8)
	if err != nil {
		return err
	}
	s.off.TaskRealParent = solved(rp.off, "points to another task (pid 1 and 2 to init_task, init_task to itself); equal to parent on every task (none traced), declared first")
	s.off.TaskParent = solved(p.off, "same values as real_parent; declared right after it")

	// Kernel threads are kthreadd and its children; user tasks are init
	// and its descendants. Reparented orphans and zombies keep this true.
	rpo := int(rp.off)
	s.kthreads = []*taskImage{s.init, kthreadd}
	// underInit memoizes whether a task descends from init, so deep or
	// looping parent chains cost one visit per task.
	underInit := map[*taskImage]bool{initP: true, s.init: false, kthreadd: false}
	var descends func(t *taskImage, depth int) bool
	descends = func(t *taskImage, depth int) bool {
		if v, ok := underInit[t]; ok {
			return v
		}
		underInit[t] = false // a loop in the chain reaches no init
		p := s.byBase[le64(t.b, rpo)]
		if p == nil || depth > len(s.tasks) {
			return false
		}
		// Iterative enough: chains are bounded by the task count, and
		// each task is resolved once.
		v := descends(p, depth+1)
		underInit[t] = v
		return v
	}
	for _, t := range s.tasks {
		if t == kthreadd || t == s.init {
			continue
		}
		if le64(t.b, rpo) == kthreadd.base {
			s.kthreads = append(s.kthreads, t)
			continue
		}
		if descends(t, 0) {
			s.users = append(s.users, t)
		}
	}
	return nil
}

// maxHelperMisses is how many of kthreadd's n children may lack
// PF_KTHREAD (user-mode helpers) before an offset is rejected.
func maxHelperMisses(n int) int { return max(1, n/20) }

// solveFlags finds task_struct.flags: PF_KTHREAD set in init_task,
// kthreadd and nearly every other kernel thread (see maxHelperMisses),
// clear in every user task that has an mm; not the
// upper half of a kernel pointer (which would have bit 21 set too).
func (s *solver) solveFlags() error {
	if !s.off.TaskMM.Known() {
		return fmt.Errorf("needs task_struct.mm")
	}
	// Strictly first: every kernel thread has the bit. Only if no offset
	// passes that, allow a few user-mode helpers among kthreadd's
	// children; tolerance from the start would let other fields through.
	cands, err := s.flagsCandidates(0)
	if err != nil {
		return err
	}
	how := fmt.Sprintf("PF_KTHREAD (%#x) set in init_task and the %d kernel threads, clear in every user task with an mm", pfKthread, len(s.kthreads))
	if len(cands) == 0 {
		if cands, err = s.flagsCandidates(maxHelperMisses(len(s.kthreads))); err != nil {
			return err
		}
		// Of the offsets that pass, the one that misses fewest kernel
		// threads, if it alone does.
		best, tie := -1, false
		for i, c := range cands {
			switch {
			case best < 0 || c.misses < cands[best].misses:
				best, tie = i, false
			case c.misses == cands[best].misses:
				tie = true
			}
		}
		if best >= 0 && !tie {
			cands = cands[best : best+1]
		}
		how = fmt.Sprintf("PF_KTHREAD (%#x) set in init_task, kthreadd and all but %d of the %d kernel threads (user-mode helpers caught before exec), fewest misses of any offset, clear in every user task with an mm", pfKthread, cands[0].misses, len(s.kthreads))
	}
	if len(cands) > 1 {
		// A field can mirror PF_KTHREAD; the idle task tells them apart:
		// init_task is CPU 0's idle task, the only task in the list with
		// PF_IDLE (init_idle, since 4.12).
		var idle []candidate
		for _, c := range cands {
			if s.idleOnlyInInit(c.off) {
				idle = append(idle, c)
			}
		}
		if len(idle) > 0 {
			cands = idle
			how += "; PF_IDLE set in init_task only"
		}
	}
	c, err := one("task_struct.flags", cands)
	if err != nil {
		return err
	}
	s.off.TaskFlags = solved(c.off, how)
	return nil
}

// idleOnlyInInit reports whether PF_IDLE is set at offset o in init_task
// and in no other task.
func (s *solver) idleOnlyInInit(o int) bool {
	if le32(s.init.b, o)&pfIdle == 0 {
		return false
	}
	for _, t := range s.tasks {
		if t != s.init && le32(t.b, o)&pfIdle != 0 {
			return false
		}
	}
	return true
}

// flagsCandidates lists the offsets where PF_KTHREAD is set in init_task,
// kthreadd and all but at most misses of the other kernel threads, and
// clear in every user task with an mm.
func (s *solver) flagsCandidates(misses int) ([]candidate, error) {
	var cands []candidate
	for o := 0; o+4 <= s.minWindow(); o += 4 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return nil, err
		}
		ok := true
		missed := 0
		for i, t := range s.kthreads {
			v := le32(t.b, o)
			if v&0xffff0000 == 0xffff0000 {
				ok = false
				break
			}
			if v&pfKthread == 0 {
				// init_task and kthreadd (the first two) must have it.
				missed++
				if i < 2 || missed > misses {
					ok = false
					break
				}
			}
		}
		if !ok {
			continue
		}
		users := 0
		for _, t := range s.users {
			if t.mm == 0 {
				continue
			}
			users++
			if le32(t.b, o)&pfKthread != 0 {
				ok = false
				break
			}
		}
		if ok && users > 0 {
			cands = append(cands, candidate{off: o, misses: missed})
		}
	}
	return cands, nil
}

// validState reports whether v can be a task's state: TASK_RUNNING (0), or
// at most one of the states in the low byte (TASK_INTERRUPTIBLE 1,
// TASK_UNINTERRUPTIBLE 2, __TASK_STOPPED 4, __TASK_TRACED 8, EXIT_DEAD,
// EXIT_ZOMBIE, TASK_PARKED, TASK_DEAD) with modifier bits above it
// (TASK_WAKEKILL 0x100, TASK_NOLOAD 0x400, TASK_FREEZABLE 0x2000...), all
// below 0x10000 in every version (include/linux/sched.h).
func validState(v uint32) bool {
	low := v & 0xff
	return v < 0x10000 && low&(low-1) == 0
}

// stateHead bounds the offset of task_struct.__state.
const stateHead = 0x40

// solveState finds task_struct.__state (state before 5.14): 0
// (TASK_RUNNING) in init_task, which is the running idle task; a valid
// state in every task; never TASK_DEAD (0x80) in a task that still has an
// mm (do_task_dead comes after exit_mm); TASK_INTERRUPTIBLE in most user
// tasks, which sleep waiting for something; at most half the tasks
// running; and a sleep with modifier bits (TASK_IDLE 0x402,
// TASK_KILLABLE 0x102, TASK_FREEZABLE 0x2000...) in at least one task,
// as kernel threads sleep in TASK_IDLE since 4.2; and within the first
// stateHead bytes. Other small fields (CPU numbers, counters) fail one of
// these; copies of the state elsewhere fail only the last.
func (s *solver) solveState() error {
	if len(s.users) == 0 {
		return fmt.Errorf("no user tasks to check sleeping states on")
	}
	var cands []candidate
	// The scheduler's state word has always been at the head of
	// task_struct (first member before 4.9, right after thread_info
	// since), outside the part CONFIG_RANDSTRUCT shuffles. Stale copies
	// of it elsewhere in the structure pass every value test.
	for o := 0; o+4 <= min(stateHead, s.minWindow()); o += 4 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return err
		}
		if le32(s.init.b, o) != 0 || s.taken(o, 4) {
			continue
		}
		ok := true
		running, modified := 0, 0
		for _, t := range s.tasks {
			v := le32(t.b, o)
			if !validState(v) {
				ok = false
				break
			}
			if v == 0 {
				running++
			}
			if v >= 0x100 {
				modified++
			}
		}
		if !ok || running*2 > len(s.tasks) || modified == 0 {
			continue
		}
		interruptible := 0
		for _, t := range s.users {
			v := le32(t.b, o)
			if t.mm != 0 && v&0x80 != 0 {
				ok = false
				break
			}
			// TASK_INTERRUPTIBLE, maybe with TASK_FREEZABLE (6.1+).
			if v&0xff == 1 {
				interruptible++
			}
		}
		if !ok || interruptible*2 <= len(s.users) {
			continue
		}
		cands = append(cands, candidate{off: o})
	}
	c, err := one("task_struct.__state", cands)
	if err != nil {
		return err
	}
	s.off.TaskState = solved(c.off, "in the head of task_struct; 0 in init_task; one state plus modifier bits in every task, modifiers in some; not TASK_DEAD with an mm; TASK_INTERRUPTIBLE in most user tasks; at most half running")
	return nil
}

// solveStartTime finds task_struct.start_time: nanoseconds since boot at
// fork, so 0 in init_task, non-zero elsewhere, and increasing along the
// tasks list, to which fork appends (a few concurrent forks on other CPUs
// may be out of order). start_boottime (real_start_time before 5.5)
// differs only by time spent suspended, and follows it.
func (s *solver) solveStartTime() error {
	var cands []candidate
	for o := 0; o+8 <= s.minWindow(); o += 8 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return err
		}
		if le64(s.init.b, o) != 0 || s.taken(o, 8) {
			continue
		}
		ok := true
		vals := make([]uint64, 0, len(s.tasks))
		var prev uint64
		down, same := 0, 0
		for _, t := range s.tasks[1:] {
			v := le64(t.b, o)
			if v == 0 || v >= 1<<62 {
				ok = false
				break
			}
			if v < prev {
				down++
			}
			if v == prev {
				same++
			}
			prev = v
			vals = append(vals, v)
		}
		// A clock: rarely going back (concurrent forks), mostly moving
		// (early boot clocks tick in jiffies, so some forks share a
		// value; fields that stay constant are not clocks).
		if !ok || down*20 > len(vals) || same*2 > len(vals) || prev < 1000000 {
			continue
		}
		cands = append(cands, candidate{off: o, vals: vals})
	}
	if len(cands) == 1 {
		s.off.TaskStartTime = solved(cands[0].off, "0 in init_task, nanoseconds increasing along the tasks list")
		return nil
	}
	// start_boottime is CLOCK_BOOTTIME (monotonic plus time suspended),
	// read right after start_time in copy_process: never smaller.
	if len(cands) == 2 && cands[1].off == cands[0].off+8 {
		a, b := cands[0], cands[1]
		if le(a.vals, b.vals) != le(b.vals, a.vals) {
			if le(b.vals, a.vals) {
				a = b
			}
			s.off.TaskStartTime = solved(a.off, "0 in init_task, nanoseconds increasing along the tasks list; of the two such clocks side by side, the one never larger (start_boottime = CLOCK_MONOTONIC + suspend, read after it)")
			return nil
		}
	}
	st, _, err := twins("task_struct.start_time", cands, 8)
	if err != nil {
		return err
	}
	s.off.TaskStartTime = solved(st.off, "0 in init_task, nanoseconds increasing along the tasks list; equal to start_boottime (no suspend), declared first")
	return nil
}

// le reports whether a[i] <= b[i] for every i.
func le(a, b []uint64) bool {
	for i := range a {
		if a[i] > b[i] {
			return false
		}
	}
	return true
}
