package introspect

import (
	"bytes"
	"errors"
	"fmt"
	"sort"

	"github.com/kvmscope/kvmscope/guestmem"
)

// Process is one task as the guest kernel keeps it. Fields whose offsets
// are unknown are -1 (ids) or empty.
type Process struct {
	PID  int `json:"pid"`
	TGID int `json:"tgid"`
	// PPID is the thread-group id of real_parent, as /proc/PID/status
	// shows it (0 for init and kthreadd, whose parent is init_task).
	PPID int    `json:"ppid"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
	EUID int    `json:"euid"`
	EGID int    `json:"egid"`
	Comm string `json:"comm"`
	// State is the letter ps and /proc show: R S D T t Z P I (? when
	// unknown).
	State   string `json:"state"`
	KThread bool   `json:"kthread"`
	// Threads is the number of threads in the group (0 when unknown).
	Threads int `json:"threads"`
	// StartTime is nanoseconds since boot (CLOCK_MONOTONIC) at fork.
	StartTime uint64 `json:"start_time_ns"`
	// PGD is the guest physical address of the process's top page table
	// (mm->pgd); 0 for kernel threads.
	PGD uint64 `json:"pgd,omitempty"`
	// Cmdline is argv, read through the process's own page tables; nil
	// when the pages are not present or the task has no mm.
	Cmdline []string `json:"cmdline,omitempty"`
	// Task is the task_struct's kernel virtual address.
	Task uint64 `json:"task"`
}

// ProcessOptions tunes Processes.
type ProcessOptions struct {
	// Threads lists every thread, not only thread-group leaders.
	Threads bool
	// NoCmdline skips reading command lines (user memory).
	NoCmdline bool
}

// maxCmdline bounds the bytes of a command line read.
const maxCmdline = 4096

// Processes lists the guest's processes: one entry per thread-group
// leader, or every thread with opts.Threads, in tasks-list order. It
// needs at least the tasks, comm and pid offsets.
//
// A damaged tasks list (a node whose prev does not lead back, a cycle,
// an unreadable node, more than maxTasks nodes) ends the walk there: the
// processes read before the break are returned with a *PartialError that
// names the damage. CrossViewTasks finds the tasks beyond the break.
func (k *Kernel) Processes(off *Offsets, opts ProcessOptions) ([]Process, error) {
	initTask, ok := k.Symbol("init_task")
	if !ok {
		return nil, fmt.Errorf("processes: kallsyms has no init_task: %w", ErrNotFound)
	}
	return processes(k, off, initTask, opts)
}

func processes(k *Kernel, off *Offsets, initTask uint64, opts ProcessOptions) ([]Process, error) {
	for _, m := range []Offset{off.TaskTasks, off.TaskComm, off.TaskPID} {
		if !m.Known() {
			return nil, fmt.Errorf("processes: tasks, comm and pid: %w", ErrOffsetsMissing)
		}
	}
	r := newTaskReader(k, off)
	var out []Process
	// All thread lists together may not hold more than this many nodes.
	threadBudget := 2 * maxTasks
	threadsKnown := off.TaskSignal.Known() && off.TaskThreadNode.Known() && off.SignalThreadHd.Known()
	type parentOf struct {
		i      int // index in out
		parent uint64
	}
	var parents []parentOf
	var groups []group        // each leader and its threads listed after it
	var counts []threadCount  // groups whose size is signal->nr_threads
	tgids := map[uint64]int{} // task -> tgid
	// Walk init_task's tasks list (for_each_process) with the reads that
	// fetch each task's members: each task's bytes hold its tasks links,
	// checked both ways as listNodes does.
	lo := uint64(off.TaskTasks.Value)
	head := initTask + lo
	seen := map[uint64]bool{}
	cur, prevNode := initTask, uint64(0)
	var initB []byte
	// The bytes of one leader, read again for each: nothing keeps them
	// past its iteration but initB, a copy.
	lb := make([]byte, r.hi-r.lo)
	partial := &PartialError{}
	whole := false     // the walk came back to the head
	budgetHit := false // the thread lists held more than threadBudget
	for {
		if len(seen) >= maxTasks+1 {
			partial.add("processes: tasks list at %#x: more than %d nodes", head, maxTasks)
			break
		}
		seen[cur] = true
		b, err := r.readInto(lb, cur)
		if err != nil {
			if cur == initTask {
				return nil, fmt.Errorf("processes: %w", err)
			}
			partial.add("processes: tasks list at %#x: node %#x (after %d tasks): %v", head, cur+lo, len(seen)-1, err)
			break
		}
		if cur == initTask {
			initB = append([]byte(nil), b...)
		} else if pr := r.u64(b, off.TaskTasks.Value+8); pr != prevNode {
			partial.add("processes: tasks list at %#x: node %#x (after %d tasks): prev is %#x, want %#x", head, cur+lo, len(seen)-1, pr, prevNode)
			break
		}
		p := r.process(cur, b, len(out))
		if parent, ok := r.field(b, off.TaskRealParent, 8); ok {
			parents = append(parents, parentOf{len(out), parent})
		}
		if p.TGID >= 0 {
			tgids[cur] = p.TGID
		}
		var threads []Process
		if threadsKnown {
			n, single := r.singleThread(b)
			if !single && !opts.Threads && off.SignalNrThreads.Known() {
				// signal->nr_threads, read with the others' after the
				// walk, instead of a walk of the thread list.
				counts = append(counts, threadCount{i: len(out), signal: r.u64(b, off.TaskSignal.Value)})
				n, single = 0, true
			}
			if !single {
				n = 1 // the leader
				err := r.threads(cur, b, &threadBudget, opts.Threads, func(th uint64, tb []byte) {
					n++
					if tb == nil {
						return
					}
					tp := r.process(th, tb, len(out)+1+len(threads))
					if parent, ok := r.field(tb, off.TaskRealParent, 8); ok {
						parents = append(parents, parentOf{len(out) + 1 + len(threads), parent})
					}
					threads = append(threads, tp)
				})
				// A task exiting while we look may have a broken
				// thread list; its count stays unknown (0) and the
				// threads read before the break are kept.
				if errors.Is(err, ErrBudget) && !budgetHit {
					budgetHit = true
					partial.add("processes: threads of %#x: %v", cur, err)
				}
				if err != nil {
					n = 0
				}
			}
			p.Threads = n
		}
		for i := range threads {
			threads[i].Threads = p.Threads
		}
		groups = append(groups, group{i: len(out), n: 1 + len(threads)})
		out = append(out, p)
		out = append(out, threads...)
		if len(out) > maxTasks {
			partial.add("processes: more than %d tasks", maxTasks)
			break
		}
		next := r.u64(b, off.TaskTasks.Value)
		if next == head {
			whole = true
			break
		}
		if !k.kernelPtr(next) || next < lo {
			partial.add("processes: tasks list at %#x: node %d: next %#x is not a kernel address", head, len(seen), next)
			break
		}
		if seen[next-lo] {
			partial.add("processes: tasks list at %#x: node %#x appears twice (the list does not lead back to its head)", head, next)
			break
		}
		prevNode, cur = cur+lo, next-lo
	}
	if pr := r.u64(initB, off.TaskTasks.Value+8); whole && pr != cur+lo {
		partial.add("processes: tasks list at %#x: head's prev %#x is not the last node %#x", head, pr, cur+lo)
	}
	// The members behind each task's pointers (creds, mm, signal), one
	// batched read for all tasks, then the command lines through each
	// process's page tables, one batched read per page-table level.
	r.resolve(out)
	r.countThreads(out, counts)
	if !opts.NoCmdline {
		r.readCmdlines(out, groups)
	}
	// PPid is the tgid of real_parent, most often a task seen above.
	if off.TaskTGID.Known() {
		for _, p := range parents {
			if g, ok := tgids[p.parent]; ok {
				out[p.i].PPID = g
			} else if v, err := k.ReadU32(p.parent + uint64(off.TaskTGID.Value)); err == nil {
				out[p.i].PPID = int(v)
			}
		}
	}
	return out, partial.orNil()
}

// taskReader reads the members of task_structs: each task's members in
// one batched read of just their bytes (never the whole structure), and
// what the tasks point to (creds, mm) in batched reads for all tasks.
type taskReader struct {
	k      *Kernel
	off    *Offsets
	lo, hi int64
	// spans are the byte ranges of task_struct that hold the members,
	// relative to the task, merged where they lie close.
	spans [][2]int64
	// refs[i] is what out[i] points to, resolved after the walk.
	refs []taskRefs
	// mms are the members read of each mm, by address (resolve).
	mms map[uint64]mmMembers
	// reqs and scratch are reused by every readInto.
	reqs    []kernelRead
	scratch batchScratch
}

// taskRefs are the pointers of one task that resolve reads.
type taskRefs struct{ cred, mm uint64 }

// group is a thread-group leader at out[i] and its n-1 threads after it.
type group struct{ i, n int }

// threadCount is a group whose size is read from signal->nr_threads.
type threadCount struct {
	i      int
	signal uint64
}

// spanGap is how far apart two members may lie and still be read as one
// range: a read of live memory costs about as much per range as per 128
// bytes copied.
const spanGap = 128

func newTaskReader(k *Kernel, off *Offsets) *taskReader {
	r := &taskReader{k: k, off: off, lo: 1 << 62}
	var ms [][2]int64
	for _, m := range []struct {
		o Offset
		n int64
	}{
		{off.TaskComm, 16}, {off.TaskPID, 4}, {off.TaskTGID, 4}, {off.TaskRealParent, 8},
		{off.TaskMM, 8}, {off.TaskRealCred, 8}, {off.TaskCred, 8}, {off.TaskFlags, 4},
		{off.TaskState, 4}, {off.TaskStartTime, 8}, {off.TaskTasks, 16},
		{off.TaskSignal, 8}, {off.TaskThreadNode, 16},
	} {
		if m.o.Known() {
			r.lo = min(r.lo, m.o.Value)
			r.hi = max(r.hi, m.o.Value+m.n)
			ms = append(ms, [2]int64{m.o.Value, m.o.Value + m.n})
		}
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i][0] < ms[j][0] })
	for _, m := range ms {
		if n := len(r.spans); n > 0 && m[0] <= r.spans[n-1][1]+spanGap {
			r.spans[n-1][1] = max(r.spans[n-1][1], m[1])
			continue
		}
		r.spans = append(r.spans, m)
	}
	return r
}

func (r *taskReader) field(b []byte, o Offset, size int) (uint64, bool) {
	if !o.Known() {
		return 0, false
	}
	i := int(o.Value - r.lo)
	if size == 4 {
		return uint64(le32(b, i)), true
	}
	return le64(b, i), true
}

func (r *taskReader) u64(b []byte, off int64) uint64 { return le64(b, int(off-r.lo)) }

// readInto reads into b (r.hi-r.lo bytes) the task's bytes from r.lo to
// r.hi, of which only the members' spans, in one batched read; b's other
// bytes are left as they were, and nothing reads them.
func (r *taskReader) readInto(b []byte, task uint64) ([]byte, error) {
	reqs := r.reqs[:0]
	for _, s := range r.spans {
		reqs = append(reqs, kernelRead{VA: task + uint64(s[0]), Buf: b[s[0]-r.lo : s[1]-r.lo]})
	}
	r.reqs = reqs
	r.k.readKernelBatchInto(reqs, &r.scratch)
	for _, q := range reqs {
		if q.Err != nil {
			return nil, fmt.Errorf("read task_struct at %#x: %w", task, q.Err)
		}
	}
	return b, nil
}

// singleThread reports from the task's own bytes whether its thread list
// holds only the task: its thread_node links both lead to its signal
// struct's thread_head.
func (r *taskReader) singleThread(b []byte) (int, bool) {
	o := r.off
	h := r.u64(b, o.TaskSignal.Value) + uint64(o.SignalThreadHd.Value)
	if r.u64(b, o.TaskThreadNode.Value) == h && r.u64(b, o.TaskThreadNode.Value+8) == h {
		return 1, true
	}
	return 0, false
}

// threads walks the thread list of the group whose leader is at leader
// (its bytes b), calling f for every thread but the leader: with the
// thread's bytes when read is set (the walk then follows the links in
// them, one read per thread), else with nil bytes (one 16-byte read per
// thread). Links are checked both ways; every node takes one from
// *budget.
func (r *taskReader) threads(leader uint64, b []byte, budget *int, read bool, f func(th uint64, tb []byte)) error {
	o := r.off
	tn := uint64(o.TaskThreadNode.Value)
	head := r.u64(b, o.TaskSignal.Value) + uint64(o.SignalThreadHd.Value)
	self := leader + tn
	seen := map[uint64]bool{}
	prev, cur := self, r.u64(b, o.TaskThreadNode.Value)
	for cur != self {
		if *budget--; *budget < 0 {
			return ErrBudget
		}
		if !r.k.kernelPtr(cur) || seen[cur] {
			return fmt.Errorf("threads of %#x: bad or repeated node %#x", leader, cur)
		}
		seen[cur] = true
		var next, back uint64
		if read && cur != head {
			tb, err := r.readInto(make([]byte, r.hi-r.lo), cur-tn)
			if err != nil {
				return fmt.Errorf("threads of %#x: %w", leader, err)
			}
			next, back = r.u64(tb, o.TaskThreadNode.Value), r.u64(tb, o.TaskThreadNode.Value+8)
			if back == prev {
				f(cur-tn, tb)
			}
		} else {
			var l [16]byte
			if err := r.k.ReadVirt(l[:], cur); err != nil {
				return fmt.Errorf("threads of %#x: %w", leader, err)
			}
			next, back = le64(l[:], 0), le64(l[:], 8)
			if cur != head && back == prev {
				f(cur-tn, nil)
			}
		}
		if back != prev {
			return fmt.Errorf("threads of %#x: node %#x: prev is %#x, want %#x", leader, cur, back, prev)
		}
		prev, cur = cur, next
	}
	if r.u64(b, o.TaskThreadNode.Value+8) != prev {
		return fmt.Errorf("threads of %#x: the leader's prev is not the last node %#x", leader, prev)
	}
	return nil
}

// process decodes the task's bytes b, the task to be listed at out[i]; the
// members behind its pointers are filled in later by resolve.
func (r *taskReader) process(task uint64, b []byte, i int) Process {
	o := r.off
	p := Process{Task: task, TGID: -1, PPID: -1, UID: -1, GID: -1, EUID: -1, EGID: -1, State: "?"}
	ci := int(o.TaskComm.Value - r.lo)
	name := b[ci : ci+16]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	p.Comm = string(name)
	v, _ := r.field(b, o.TaskPID, 4)
	p.PID = int(v)
	if v, ok := r.field(b, o.TaskTGID, 4); ok {
		p.TGID = int(v)
	}
	mm, haveMM := r.field(b, o.TaskMM, 8)
	if flags, ok := r.field(b, o.TaskFlags, 4); ok {
		p.KThread = flags&pfKthread != 0
	} else if haveMM {
		p.KThread = mm == 0
	}
	if st, ok := r.field(b, o.TaskState, 4); ok {
		p.State = stateLetter(uint32(st))
	}
	if t, ok := r.field(b, o.TaskStartTime, 8); ok {
		p.StartTime = t
	}
	credOff := o.TaskRealCred
	if !credOff.Known() {
		credOff = o.TaskCred
	}
	var refs taskRefs
	refs.cred, _ = r.field(b, credOff, 8)
	refs.mm = mm
	for len(r.refs) <= i {
		r.refs = append(r.refs, taskRefs{})
	}
	r.refs[i] = refs
	return p
}

// mmMembers is what resolve reads of each mm_struct: pgd, and
// arg_start..arg_end (adjacent in every layout seen).
type mmMembers struct {
	pgd, argStart, argEnd uint64
	ok, args              bool
}

// resolve fills in the ids from every task's cred and the page-table root
// from its mm, reading each distinct cred and mm once, all of them in one
// batched read. Tasks whose cred or mm cannot be read keep -1 and 0.
func (r *taskReader) resolve(out []Process) {
	o := r.off
	lo, hi := int64(1<<62), int64(0)
	credIDs := []Offset{o.CredUID, o.CredGID, o.CredEUID, o.CredEGID}
	for _, m := range credIDs {
		if m.Known() {
			lo, hi = min(lo, m.Value), max(hi, m.Value+4)
		}
	}
	haveCred := hi > 0 && hi-lo <= credWindow
	haveArgs := o.MMArgStart.Known() && o.MMArgEnd.Known() && o.MMArgEnd.Value == o.MMArgStart.Value+8
	var reqs []kernelRead
	creds := map[uint64]int{} // cred -> index in reqs
	mms := map[uint64]int{}   // mm -> index of its pgd read in reqs (args follow)
	for i := range out {
		if i >= len(r.refs) {
			break
		}
		c, mm := r.refs[i].cred, r.refs[i].mm
		if _, ok := creds[c]; haveCred && c != 0 && !ok {
			creds[c] = len(reqs)
			reqs = append(reqs, kernelRead{VA: c + uint64(lo), Buf: make([]byte, hi-lo)})
		}
		if _, ok := mms[mm]; o.MMPgd.Known() && mm != 0 && !ok {
			mms[mm] = len(reqs)
			reqs = append(reqs, kernelRead{VA: mm + uint64(o.MMPgd.Value), Buf: make([]byte, 8)})
			if haveArgs {
				reqs = append(reqs, kernelRead{VA: mm + uint64(o.MMArgStart.Value), Buf: make([]byte, 16)})
			}
		}
	}
	r.k.readKernelBatch(reqs)
	mm := map[uint64]mmMembers{}
	for a, j := range mms {
		var m mmMembers
		if reqs[j].Err == nil {
			if pa, err := r.k.VirtToPhys(le64(reqs[j].Buf, 0)); err == nil {
				m.pgd, m.ok = pa, true
			}
		}
		if haveArgs && reqs[j+1].Err == nil {
			m.argStart, m.argEnd, m.args = le64(reqs[j+1].Buf, 0), le64(reqs[j+1].Buf, 8), true
		}
		mm[a] = m
	}
	r.mms = mm
	for i := range out {
		if i >= len(r.refs) {
			break
		}
		if j, ok := creds[r.refs[i].cred]; ok && reqs[j].Err == nil {
			ids := [4]*int{&out[i].UID, &out[i].GID, &out[i].EUID, &out[i].EGID}
			for k, m := range credIDs {
				if m.Known() {
					*ids[k] = int(le32(reqs[j].Buf, int(m.Value-lo)))
				}
			}
		}
		if m, ok := mm[r.refs[i].mm]; ok && m.ok {
			out[i].PGD = m.pgd
		}
	}
}

// countThreads sets Threads of the groups in counts from their
// signal->nr_threads, all read in one batch: a count that cannot be read
// or makes no sense stays 0 (unknown).
func (r *taskReader) countThreads(out []Process, counts []threadCount) {
	if len(counts) == 0 {
		return
	}
	reqs := make([]kernelRead, len(counts))
	for j, c := range counts {
		reqs[j] = kernelRead{VA: c.signal + uint64(r.off.SignalNrThreads.Value), Buf: make([]byte, 4)}
	}
	r.k.readKernelBatch(reqs)
	for j, c := range counts {
		if v := le32(reqs[j].Buf, 0); reqs[j].Err == nil && v > 0 && v <= maxTasks {
			out[c.i].Threads = int(v)
		}
	}
}

// readCmdlines reads the command line of every group's leader, argv at
// mm->arg_start..arg_end (proc_pid_cmdline_read without the setproctitle
// cases), through each process's own page tables, all processes together:
// a walk per process, but one batched read per page-table level (a system
// call for a live guest) for all of them. The group's threads share it.
// Pages that are not present leave the command line short or nil.
func (r *taskReader) readCmdlines(out []Process, groups []group) {
	var reqs []guestmem.VirtReq
	var of []group
	for _, g := range groups {
		if g.i >= len(r.refs) {
			continue
		}
		m, ok := r.mms[r.refs[g.i].mm]
		if !ok || !m.ok || !m.args || m.pgd == 0 || m.argEnd <= m.argStart || m.argStart >= r.k.userTop() {
			continue
		}
		reqs = append(reqs, guestmem.VirtReq{Root: m.pgd, VA: m.argStart, Buf: make([]byte, min(m.argEnd-m.argStart, maxCmdline))})
		of = append(of, g)
	}
	if len(reqs) == 0 {
		return
	}
	guestmem.ReadVirtBatch(r.k.Mem, r.k.Levels, reqs)
	for i, g := range of {
		if reqs[i].N == 0 {
			continue
		}
		args := splitArgs(bytes.TrimRight(reqs[i].Buf[:reqs[i].N], "\x00"))
		for k := g.i; k < g.i+g.n && k < len(out); k++ {
			out[k].Cmdline = args
		}
	}
}

func splitArgs(b []byte) []string {
	var args []string
	for _, a := range bytes.Split(b, []byte{0}) {
		args = append(args, string(a))
	}
	return args
}

// stateLetter turns a task state into the letter /proc shows
// (fs/proc/array.c, task_state_array; TASK_IDLE shown as I).
func stateLetter(v uint32) string {
	switch {
	case v == 0:
		return "R"
	case v&0x402 == 0x402: // TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
		return "I"
	case v&1 != 0:
		return "S"
	case v&2 != 0:
		return "D"
	case v&4 != 0:
		return "T"
	case v&8 != 0:
		return "t"
	case v&0x40 != 0:
		return "P"
	case v&0x80 != 0: // TASK_DEAD: exited, waiting to be reaped
		return "Z"
	default:
		return "?"
	}
}

// kernelRead is one read of kernel virtual memory in a batch.
type kernelRead struct {
	VA  uint64
	Buf []byte
	Err error
}

// readKernelBatch does every read of reqs in one batched read of guest
// physical memory (one system call for a live guest, copies for memfd RAM
// or a core), with one piece per physically contiguous run of pages: a
// slab object in the direct map is one run. A read that cannot be
// translated fails alone.
func (k *Kernel) readKernelBatch(reqs []kernelRead) {
	k.readKernelBatchInto(reqs, &batchScratch{})
}

// batchScratch is the memory of readKernelBatchInto, kept by callers that
// make many batches.
type batchScratch struct {
	phys  []guestmem.PhysReq
	owner []int
}

// readKernelBatchInto is readKernelBatch using s.
func (k *Kernel) readKernelBatchInto(reqs []kernelRead, s *batchScratch) {
	phys, owner := s.phys[:0], s.owner[:0]
	defer func() { s.phys, s.owner = phys, owner }()
	for i := range reqs {
		va, p := reqs[i].VA, reqs[i].Buf
		for len(p) > 0 {
			pa, err := k.VirtToPhys(va)
			if err != nil {
				reqs[i].Err = err
				break
			}
			n := min(uint64(len(p)), 0x1000-va&0xfff)
			for n < uint64(len(p)) {
				next, err := k.VirtToPhys(va + n)
				if err != nil || next != pa+n {
					break
				}
				n += min(uint64(len(p))-n, 0x1000)
			}
			phys = append(phys, guestmem.PhysReq{GPA: pa, Buf: p[:n]})
			owner = append(owner, i)
			p, va = p[n:], va+n
		}
	}
	guestmem.ReadBatch(k.Mem, phys)
	for j, q := range phys {
		if r := &reqs[owner[j]]; q.Err != nil && r.Err == nil {
			r.Err = fmt.Errorf("read kernel va %#x (pa %#x): %w", r.VA, q.GPA, q.Err)
		}
	}
}
