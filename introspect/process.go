package introspect

import (
	"bytes"
	"errors"
	"fmt"

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
	var jobs []cmdlineJob
	tgids := map[uint64]int{} // task -> tgid
	// Walk init_task's tasks list (for_each_process) with the reads that
	// fetch each task's members: each task's bytes hold its tasks links,
	// checked both ways as listNodes does.
	lo := uint64(off.TaskTasks.Value)
	head := initTask + lo
	seen := map[uint64]bool{}
	cur, prevNode := initTask, uint64(0)
	var initB []byte
	for {
		if len(seen) >= maxTasks+1 {
			return nil, fmt.Errorf("processes: tasks list at %#x: more than %d nodes", head, maxTasks)
		}
		seen[cur] = true
		b, err := r.read(cur)
		if err != nil {
			return nil, fmt.Errorf("processes: %w", err)
		}
		if cur == initTask {
			initB = b
		} else if pr := r.u64(b, off.TaskTasks.Value+8); pr != prevNode {
			return nil, fmt.Errorf("processes: tasks list at %#x: node %#x: prev is %#x, want %#x", head, cur+lo, pr, prevNode)
		}
		p := r.process(cur, b)
		if parent, ok := r.field(b, off.TaskRealParent, 8); ok {
			parents = append(parents, parentOf{len(out), parent})
		}
		if p.TGID >= 0 {
			tgids[cur] = p.TGID
		}
		// Command lines are read after the walk, all together (one
		// batched read per page-table level for every process).
		job, hasJob := cmdlineJob{}, false
		if !opts.NoCmdline {
			job, hasJob = r.cmdlineJob(b)
		}
		var threads []Process
		if threadsKnown {
			n, single := r.singleThread(b)
			if !single && !opts.Threads && off.SignalNrThreads.Known() {
				// One read instead of one per thread.
				if v, err := k.ReadU32(r.u64(b, off.TaskSignal.Value) + uint64(off.SignalNrThreads.Value)); err == nil && v > 0 && v <= maxTasks {
					n, single = int(v), true
				}
			}
			if !single {
				n = 1 // the leader
				err := r.threads(cur, b, &threadBudget, opts.Threads, func(th uint64, tb []byte) {
					n++
					if tb == nil {
						return
					}
					tp := r.process(th, tb)
					if parent, ok := r.field(tb, off.TaskRealParent, 8); ok {
						parents = append(parents, parentOf{len(out) + 1 + len(threads), parent})
					}
					threads = append(threads, tp)
				})
				// A task exiting while we look may have a broken
				// thread list; its count stays unknown (0) and the
				// threads read before the break are kept.
				if errors.Is(err, ErrBudget) {
					return nil, fmt.Errorf("processes: threads: %w", err)
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
		if hasJob {
			job.i, job.n = len(out), 1+len(threads)
			jobs = append(jobs, job)
		}
		out = append(out, p)
		out = append(out, threads...)
		if len(out) > maxTasks {
			return nil, fmt.Errorf("processes: more than %d tasks", maxTasks)
		}
		next := r.u64(b, off.TaskTasks.Value)
		if next == head {
			break
		}
		if !k.kernelPtr(next) || next < lo {
			return nil, fmt.Errorf("processes: tasks list at %#x: node %d: %#x is not a kernel address", head, len(seen), next)
		}
		if seen[next-lo] {
			return nil, fmt.Errorf("processes: tasks list at %#x: node %#x appears twice (the list does not lead back to its head)", head, next)
		}
		prevNode, cur = cur+lo, next-lo
	}
	if pr := r.u64(initB, off.TaskTasks.Value+8); pr != cur+lo {
		return nil, fmt.Errorf("processes: tasks list at %#x: head's prev %#x is not the last node %#x", head, pr, cur+lo)
	}
	r.readCmdlines(out, jobs)
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
	return out, nil
}

// taskReader reads the members of task_structs in one read per task.
type taskReader struct {
	k      *Kernel
	off    *Offsets
	lo, hi int64
	creds  map[uint64][4]int // cred address -> uid, gid, euid, egid
	pgds   map[uint64]uint64 // mm -> physical PGD (threads share an mm)
}

func newTaskReader(k *Kernel, off *Offsets) *taskReader {
	r := &taskReader{k: k, off: off, lo: 1 << 62, creds: map[uint64][4]int{}, pgds: map[uint64]uint64{}}
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
		}
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

// read returns the task's bytes from r.lo to r.hi.
func (r *taskReader) read(task uint64) ([]byte, error) {
	b := make([]byte, r.hi-r.lo)
	if err := r.k.readContig(b, task+uint64(r.lo)); err != nil {
		return nil, fmt.Errorf("read task_struct at %#x: %w", task, err)
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

// readCred reads the ids of the cred at va in one read (-1 when unknown).
func (r *taskReader) readCred(va uint64) [4]int {
	ids := [4]int{-1, -1, -1, -1}
	o := r.off
	members := []Offset{o.CredUID, o.CredGID, o.CredEUID, o.CredEGID}
	lo, hi := int64(1<<62), int64(0)
	for _, m := range members {
		if m.Known() {
			lo, hi = min(lo, m.Value), max(hi, m.Value+4)
		}
	}
	if hi == 0 || hi-lo > credWindow {
		return ids
	}
	b := make([]byte, hi-lo)
	if err := r.k.ReadVirt(b, va+uint64(lo)); err != nil {
		return ids
	}
	for i, m := range members {
		if m.Known() {
			ids[i] = int(le32(b, int(m.Value-lo)))
		}
	}
	return ids
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
			tb, err := r.read(cur - tn)
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

// process decodes the task's bytes b.
func (r *taskReader) process(task uint64, b []byte) Process {
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
	if cred, ok := r.field(b, credOff, 8); ok && cred != 0 {
		ids, ok := r.creds[cred]
		if !ok {
			ids = r.readCred(cred)
			r.creds[cred] = ids
		}
		p.UID, p.GID, p.EUID, p.EGID = ids[0], ids[1], ids[2], ids[3]
	}
	if haveMM && mm != 0 && o.MMPgd.Known() {
		pa, ok := r.pgds[mm]
		if !ok {
			if pgd, err := r.k.ReadPtr(mm + uint64(o.MMPgd.Value)); err == nil {
				pa, _ = r.k.VirtToPhys(pgd)
			}
			r.pgds[mm] = pa
		}
		p.PGD = pa
	}
	return p
}

// cmdlineJob is a command line to read: argv of the process at out[i]
// (and its n-1 threads after it) lies at start..start+len in the address
// space whose top page table is at pgd.
type cmdlineJob struct {
	i, n       int
	pgd, start uint64
	len        uint64
}

// cmdlineJob finds where a task's argv is: mm->arg_start..arg_end
// (proc_pid_cmdline_read without the setproctitle cases).
func (r *taskReader) cmdlineJob(b []byte) (cmdlineJob, bool) {
	o := r.off
	if !o.TaskMM.Known() || !o.MMPgd.Known() || !o.MMArgStart.Known() || !o.MMArgEnd.Known() {
		return cmdlineJob{}, false
	}
	mm, _ := r.field(b, o.TaskMM, 8)
	if mm == 0 {
		return cmdlineJob{}, false
	}
	pa, ok := r.pgds[mm]
	if !ok || pa == 0 {
		return cmdlineJob{}, false
	}
	var args [16]byte
	if err := r.k.ReadVirt(args[:], mm+uint64(o.MMArgStart.Value)); err != nil || o.MMArgEnd.Value != o.MMArgStart.Value+8 {
		return cmdlineJob{}, false
	}
	start, end := le64(args[:], 0), le64(args[:], 8)
	if end <= start || start >= r.k.userTop() {
		return cmdlineJob{}, false
	}
	return cmdlineJob{pgd: pa, start: start, len: min(end-start, maxCmdline)}, true
}

// readCmdlines reads the command lines of jobs through each process's own
// page tables, all processes together: a walk per process, but one batched
// read per page-table level (a system call for a live guest) for all of
// them. Pages that are not present leave the command line short or nil.
func (r *taskReader) readCmdlines(out []Process, jobs []cmdlineJob) {
	if len(jobs) == 0 {
		return
	}
	reqs := make([]guestmem.VirtReq, len(jobs))
	for i, j := range jobs {
		reqs[i] = guestmem.VirtReq{Root: j.pgd, VA: j.start, Buf: make([]byte, j.len)}
	}
	guestmem.ReadVirtBatch(r.k.userMemory(), r.k.Levels, reqs)
	for i, j := range jobs {
		if reqs[i].N == 0 {
			continue
		}
		args := splitArgs(bytes.TrimRight(reqs[i].Buf[:reqs[i].N], "\x00"))
		for k := j.i; k < j.i+j.n && k < len(out); k++ {
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

// readContig reads len(p) bytes at kernel virtual address va with one
// memory read per physically contiguous run of pages (a task_struct in
// the direct map is one run), where ReadVirt reads page by page: each
// read of live guest memory is a system call.
func (k *Kernel) readContig(p []byte, va uint64) error {
	for len(p) > 0 {
		pa, err := k.VirtToPhys(va)
		if err != nil {
			return err
		}
		n := min(uint64(len(p)), 0x1000-va&0xfff)
		for n < uint64(len(p)) {
			next, err := k.VirtToPhys(va + n)
			if err != nil || next != pa+n {
				break
			}
			n += min(uint64(len(p))-n, 0x1000)
		}
		if _, err := k.Mem.ReadAt(p[:n], int64(pa)); err != nil {
			return fmt.Errorf("read kernel va %#x (pa %#x): %w", va, pa, err)
		}
		p = p[n:]
		va += n
	}
	return nil
}
