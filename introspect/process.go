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
	err := forEachTask(k, off, initTask, func(task uint64) error {
		p, err := r.process(task)
		if err != nil {
			return err
		}
		if !opts.NoCmdline {
			p.Cmdline = r.cmdline(task)
		}
		var threads []Process
		if off.TaskSignal.Known() && off.TaskThreadNode.Known() && off.SignalThreadHd.Known() {
			n := 0
			err := forEachThread(k, off, task, &threadBudget, func(th uint64) error {
				n++
				if !opts.Threads || th == task {
					return nil
				}
				tp, err := r.process(th)
				if err != nil {
					return err
				}
				tp.Cmdline = p.Cmdline
				threads = append(threads, tp)
				return nil
			})
			// A task exiting while we look may have a broken thread
			// list; its count stays unknown (0).
			if errors.Is(err, ErrBudget) {
				return fmt.Errorf("processes: threads: %w", err)
			}
			if err == nil {
				p.Threads = n
			}
		}
		for i := range threads {
			threads[i].Threads = p.Threads
		}
		out = append(out, p)
		out = append(out, threads...)
		if len(out) > maxTasks {
			return fmt.Errorf("processes: more than %d tasks", maxTasks)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// taskReader reads the members of task_structs in one read per task.
type taskReader struct {
	k      *Kernel
	off    *Offsets
	lo, hi int64
	creds  map[uint64][3]int // cred address -> uid, gid, euid
	egids  map[uint64]int
}

func newTaskReader(k *Kernel, off *Offsets) *taskReader {
	r := &taskReader{k: k, off: off, lo: 1 << 62, creds: map[uint64][3]int{}, egids: map[uint64]int{}}
	for _, m := range []struct {
		o Offset
		n int64
	}{
		{off.TaskComm, 16}, {off.TaskPID, 4}, {off.TaskTGID, 4}, {off.TaskRealParent, 8},
		{off.TaskMM, 8}, {off.TaskRealCred, 8}, {off.TaskCred, 8}, {off.TaskFlags, 4},
		{off.TaskState, 4}, {off.TaskStartTime, 8},
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

// read returns the task's bytes from r.lo to r.hi.
func (r *taskReader) read(task uint64) ([]byte, error) {
	b := make([]byte, r.hi-r.lo)
	if err := r.k.ReadVirt(b, task+uint64(r.lo)); err != nil {
		return nil, fmt.Errorf("read task_struct at %#x: %w", task, err)
	}
	return b, nil
}

func (r *taskReader) process(task uint64) (Process, error) {
	b, err := r.read(task)
	if err != nil {
		return Process{}, err
	}
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
	if parent, ok := r.field(b, o.TaskRealParent, 8); ok && o.TaskTGID.Known() {
		// PPid is the parent's tgid.
		if v, err := r.k.ReadU32(parent + uint64(o.TaskTGID.Value)); err == nil {
			p.PPID = int(v)
		}
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
			ids = [3]int{-1, -1, -1}
			for i, m := range []Offset{o.CredUID, o.CredGID, o.CredEUID} {
				if m.Known() {
					if v, err := r.k.ReadU32(cred + uint64(m.Value)); err == nil {
						ids[i] = int(v)
					}
				}
			}
			if o.CredEGID.Known() {
				if v, err := r.k.ReadU32(cred + uint64(o.CredEGID.Value)); err == nil {
					r.egids[cred] = int(v)
				}
			}
			r.creds[cred] = ids
		}
		p.UID, p.GID, p.EUID = ids[0], ids[1], ids[2]
		if g, ok := r.egids[cred]; ok {
			p.EGID = g
		}
	}
	if haveMM && mm != 0 && o.MMPgd.Known() {
		if pgd, err := r.k.ReadPtr(mm + uint64(o.MMPgd.Value)); err == nil {
			if pa, err := r.k.VirtToPhys(pgd); err == nil {
				p.PGD = pa
			}
		}
	}
	return p, nil
}

// cmdline reads argv from mm->arg_start..arg_end through the process's own
// page tables (proc_pid_cmdline_read without the setproctitle cases).
func (r *taskReader) cmdline(task uint64) []string {
	o := r.off
	if !o.TaskMM.Known() || !o.MMPgd.Known() || !o.MMArgStart.Known() || !o.MMArgEnd.Known() {
		return nil
	}
	mm, err := r.k.ReadPtr(task + uint64(o.TaskMM.Value))
	if err != nil || mm == 0 {
		return nil
	}
	pgd, err1 := r.k.ReadPtr(mm + uint64(o.MMPgd.Value))
	start, err2 := r.k.ReadU64(mm + uint64(o.MMArgStart.Value))
	end, err3 := r.k.ReadU64(mm + uint64(o.MMArgEnd.Value))
	if err1 != nil || err2 != nil || err3 != nil || end <= start || start >= r.k.userTop() {
		return nil
	}
	pa, err := r.k.VirtToPhys(pgd)
	if err != nil {
		return nil
	}
	n := min(end-start, maxCmdline)
	buf := make([]byte, n)
	as := guestmem.NewAddressSpace(r.k.Mem, pa, r.k.Levels)
	got, _ := as.ReadAt(buf, int64(start))
	if got == 0 {
		return nil
	}
	buf = bytes.TrimRight(buf[:got], "\x00")
	return splitArgs(buf)
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
