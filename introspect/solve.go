package introspect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// The solver finds member offsets the way VMOffset does: it reads the
// task_struct of init_task and of every task it can reach from there, and
// for each member keeps the offsets at which the values, over all tasks,
// have the properties only that member has. docs/offsets.md explains each
// constraint.

// Bounds on what the solver reads, so forged memory cannot make it loop or
// allocate without limit.
const (
	// maxTasks bounds every list walk (tasks, threads, modules).
	maxTasks = 1 << 16
	// taskWindow is how many bytes of each task_struct the solver looks
	// at. The members it solves lie in the first few KiB on every x86-64
	// configuration seen (6.1 Debian: signal at 3072, size 9728); the
	// thread_struct and FPU state that make task_struct large come last.
	taskWindow = 0x2000
	// credWindow covers struct cred up to the capabilities.
	credWindow = 0x80
	// mmWindow covers struct mm_struct's head, where pgd and the
	// arg/env bounds live (6.1: pgd 0x48, arg_start 0x120).
	mmWindow = 0x400
	// signalWindow bounds the offset of signal_struct.thread_head.
	signalWindow = 0x400
	// pidMax is PID_MAX_LIMIT on 64-bit (include/linux/threads.h).
	pidMax = 4 * 1024 * 1024
	// solveBudget bounds the reads of one solve (each list node, task
	// window or page-table check counts one per started page), so
	// memory crafted to pass the cheap checks at every offset cannot
	// make it run for long. A real guest needs about ten per task
	// (Debian 6.1 with 100 tasks: 1050); the bound allows 25,000 tasks
	// and at worst about 1 GiB read.
	solveBudget = 1 << 18
)

// ErrBudget is wrapped when the solver gave up after solveBudget reads.
var ErrBudget = errors.New("solver read budget exhausted (memory looks crafted to make it search)")

// PF_KTHREAD marks kernel threads in task_struct.flags
// (include/linux/sched.h; the value has not changed since 2.6.27).
const pfKthread = 0x00200000

// pfIdle is PF_IDLE (include/linux/sched.h, since 4.12): set on idle tasks.
const pfIdle = 0x00000002

// solver holds what is known while the offsets are being solved.
type solver struct {
	k    *Kernel
	off  *Offsets
	miss *UnsolvedError

	budget int
	// work bounds the CPU spent checking candidates (one unit per task
	// per offset tried), as reads alone do not: many offsets can pass
	// cheap tests on crafted memory, each costing a pass over all tasks.
	work int
	win  int // minWindow, once the tasks are known

	init *taskImage
	// tasks are the thread-group leaders on init_task.tasks, init_task
	// first, in list order.
	tasks  []*taskImage
	byBase map[uint64]*taskImage
	// threads are the tasks that are not thread-group leaders, found
	// through signal->thread_head once thread_node is solved.
	threads []*taskImage

	// Classified by parentage once pid and real_parent are solved.
	kthreads []*taskImage
	users    []*taskImage
}

// taskImage is the first taskWindow bytes of one task_struct.
type taskImage struct {
	base   uint64
	b      []byte
	leader *taskImage // for threads: their group leader
	mm     uint64
	mmB    []byte
}

// SolveOffsets finds the offsets from guest memory alone, without BTF,
// from constraints on the members' values (docs/offsets.md). It needs the
// kallsyms symbol init_task, and modules for the module offsets. Members
// the constraints do not single out are left unknown and named, with the
// candidates, in the returned *UnsolvedError (errors.Is ErrAmbiguous when
// several offsets fit); the offsets found are still returned. When the
// steps everything depends on fail (comm, tasks, pid, real_parent) the
// later members are not tried. The result is nil only when init_task
// cannot be read.
func SolveOffsets(k *Kernel) (*Offsets, error) {
	initTask, ok := k.Symbol("init_task")
	if !ok {
		return nil, fmt.Errorf("solve offsets: kallsyms has no init_task: %w", ErrNotFound)
	}
	modules, _ := k.Symbol("modules")
	return solveOffsets(k, initTask, modules)
}

func solveOffsets(k *Kernel, initTask, modules uint64) (*Offsets, error) {
	return solveWithin(k, initTask, modules, solveBudget)
}

// solveWithin solves with the given read budget.
func solveWithin(k *Kernel, initTask, modules uint64, budget int) (*Offsets, error) {
	s := &solver{k: k, off: &Offsets{}, miss: &UnsolvedError{}, byBase: make(map[uint64]*taskImage),
		budget: budget, work: budget << 11}
	defer func() {
		if k.logf != nil {
			k.logf("offsets solver: %d of %d reads used", budget-s.budget, budget)
		}
	}()
	b, err := s.read(initTask, taskWindow)
	if err != nil {
		return nil, fmt.Errorf("solve offsets: read init_task at %#x: %w", initTask, err)
	}
	s.init = &taskImage{base: initTask, b: b}

	// The steps depend on each other: nothing can be said about the
	// other tasks before the tasks list is found, nor about kernel
	// threads before pid and real_parent tell which tasks they are.
	if err := s.solveComm(); err != nil {
		return s.off, s.fatal("task_struct.comm", err)
	}
	if err := s.solveTasks(); err != nil {
		return s.off, s.fatal("task_struct.tasks", err)
	}
	s.step("task_struct.thread_node", s.solveThreads)
	if err := s.solvePID(); err != nil {
		return s.off, s.fatal("task_struct.pid", err)
	}
	if err := s.solveParent(); err != nil {
		return s.off, s.fatal("task_struct.real_parent", err)
	}
	s.step("task_struct.mm", s.solveMM)
	s.step("task_struct.flags", s.solveFlags)
	s.step("task_struct.__state", s.solveState)
	s.step("task_struct.start_time", s.solveStartTime)
	s.step("task_struct.cred", s.solveCred)
	if s.off.TaskMM.Known() {
		s.step("mm_struct.arg_start", s.solveArgs)
	}
	if modules != 0 {
		s.step("module.list", func() error { return s.solveModules(modules) })
	} else {
		s.miss.add("module.list", errors.New("kallsyms has no modules symbol"))
	}
	return s.off, s.miss.orNil()
}

// fatal records the error of a step every later step depends on.
func (s *solver) fatal(member string, err error) error {
	s.miss.add(member, err)
	s.miss.cause = fmt.Errorf("solve offsets: %s: %w", member, err)
	return s.miss
}

// step runs an independent step; its failure only leaves its members
// unknown.
func (s *solver) step(member string, f func() error) {
	if err := f(); err != nil {
		var ue *UnsolvedError
		if errors.As(err, &ue) {
			for m, why := range ue.Members {
				s.miss.Members = setDefault(s.miss.Members, m, why)
			}
			return
		}
		s.miss.add(member, err)
	}
}

// read reads n bytes at kernel virtual address va. When the end of the
// range is not readable (a task at the end of guest RAM) it returns what
// could be read, at least one page.
func (s *solver) read(va uint64, n int) ([]byte, error) {
	if err := s.spend(1 + n/0x1000); err != nil {
		return nil, err
	}
	return readUpTo(s.k, va, n)
}

// spend takes n from the read budget.
func (s *solver) spend(n int) error {
	s.budget -= n
	if s.budget < 0 {
		return ErrBudget
	}
	return nil
}

// charge takes n from the work budget.
func (s *solver) charge(n int) error {
	s.work -= n
	if s.work < 0 {
		return ErrBudget
	}
	return nil
}

// list is listNodes within the solver's budget.
func (s *solver) list(head uint64, limit int) ([]uint64, error) {
	return listNodes(s.k, head, limit, &s.budget)
}

func readUpTo(k *Kernel, va uint64, n int) ([]byte, error) {
	b := make([]byte, n)
	if err := k.ReadVirt(b, va); err == nil {
		return b, nil
	}
	// Page by page, keeping what precedes the first failure.
	got := 0
	for got < n {
		c := min(n-got, int(0x1000-(va+uint64(got))&0xfff))
		if err := k.ReadVirt(b[got:got+c], va+uint64(got)); err != nil {
			if got == 0 {
				return nil, err
			}
			return b[:got], nil
		}
		got += c
	}
	return b, nil
}

func le64(b []byte, off int) uint64 {
	if off < 0 || off+8 > len(b) {
		return 0
	}
	return binary.LittleEndian.Uint64(b[off:])
}

func le32(b []byte, off int) uint32 {
	if off < 0 || off+4 > len(b) {
		return 0
	}
	return binary.LittleEndian.Uint32(b[off:])
}

// kernelPtr reports whether v can be a kernel virtual address: canonical
// and in the upper half.
func (k *Kernel) kernelPtr(v uint64) bool {
	if k.Levels == 5 {
		return v >= 0xff00000000000000
	}
	return v >= 0xffff800000000000
}

// listNodes walks the circular list whose head is at head and returns the
// addresses of its nodes, head excluded. Every link is checked both ways
// (next->prev == this); a list that does not come back to head within
// limit nodes, revisits a node or breaks a link is an error. Each node
// read takes one from *budget when budget is not nil.
func listNodes(k *Kernel, head uint64, limit int, budget *int) ([]uint64, error) {
	nodes, damage, err := walkList(k, head, limit, budget)
	if err != nil {
		return nil, err
	}
	if damage != "" {
		return nil, errors.New(damage)
	}
	return nodes, nil
}

// validComm reports whether b (16 bytes) holds a task name: a
// NUL-terminated string of 1 to 15 bytes; printable reports whether all of
// them are printable ASCII (a task may set any bytes with prctl).
func validComm(b []byte) (name string, ok, printable bool) {
	if len(b) < 16 {
		return "", false, false
	}
	n := 0
	for n < 16 && b[n] != 0 {
		n++
	}
	if n == 0 || n == 16 {
		return "", false, false
	}
	printable = true
	for _, c := range b[:n] {
		if c < 0x20 || c > 0x7e {
			printable = false
		}
	}
	return string(b[:n]), true, printable
}

// candidate is one offset that satisfies a member's constraints, with the
// member's value in every task it was checked on.
type candidate struct {
	off  int
	vals []uint64
	// misses counts the tasks that break the constraint where a few may
	// (task_struct.flags: user-mode helpers among kthreadd's children).
	misses int
}

func offsList(c []candidate) string {
	var s []string
	for _, x := range c {
		s = append(s, fmt.Sprintf("%#x", x.off))
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// twins decides between candidates whose values are equal on every task,
// which values alone cannot tell apart. That happens for members the
// kernel keeps in step: pid and tgid of thread-group leaders, real_parent
// and parent of untraced tasks, start_time and start_boottime on a guest
// that never suspended, real_cred and cred. The only difference left is
// their order in the structure, which has been the same since these
// members were introduced: the first and second return the two offsets in
// declaration order when exactly two candidates remain, adjacent (width
// apart), and equal everywhere. Anything else is ambiguous.
func twins(member string, cands []candidate, width int) (first, second candidate, err error) {
	switch {
	case len(cands) == 0:
		return first, second, fmt.Errorf("%s: no offset satisfies the constraints", member)
	case len(cands) == 2 && cands[1].off == cands[0].off+width && slices.Equal(cands[0].vals, cands[1].vals):
		return cands[0], cands[1], nil
	default:
		return first, second, fmt.Errorf("%s: %w: candidates %s", member, ErrAmbiguous, offsList(cands))
	}
}

// one returns the only candidate, or an error naming all of them.
func one(member string, cands []candidate) (candidate, error) {
	switch len(cands) {
	case 1:
		return cands[0], nil
	case 0:
		return candidate{}, fmt.Errorf("%s: no offset satisfies the constraints", member)
	default:
		return candidate{}, fmt.Errorf("%s: %w: candidates %s", member, ErrAmbiguous, offsList(cands))
	}
}

func solved(v int, how string) Offset {
	return Offset{Value: int64(v), Source: SourceSolved, How: how}
}

// minWindow is the shortest task image over the tasks: offsets beyond it
// cannot be checked on every task.
func (s *solver) minWindow() int {
	if s.win != 0 {
		return s.win
	}
	n := len(s.init.b)
	for _, t := range s.tasks {
		n = min(n, len(t.b))
	}
	if len(s.tasks) > 0 {
		s.win = n
	}
	return n
}

// distinct reports whether vals has no duplicates.
func distinct(vals []uint64) bool {
	c := append([]uint64(nil), vals...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	for i := 1; i < len(c); i++ {
		if c[i] == c[i-1] {
			return false
		}
	}
	return true
}

// taken reports whether [o, o+n) overlaps a task_struct member already
// solved: two members never share bytes.
func (s *solver) taken(o, n int) bool {
	for _, m := range []struct {
		off  Offset
		size int
	}{
		{s.off.TaskTasks, 16}, {s.off.TaskComm, 16}, {s.off.TaskPID, 4}, {s.off.TaskTGID, 4},
		{s.off.TaskRealParent, 8}, {s.off.TaskParent, 8}, {s.off.TaskMM, 8}, {s.off.TaskFlags, 4},
		{s.off.TaskState, 4}, {s.off.TaskStartTime, 8}, {s.off.TaskSignal, 8}, {s.off.TaskThreadNode, 16},
		{s.off.TaskRealCred, 8}, {s.off.TaskCred, 8},
	} {
		if m.off.Known() && o < int(m.off.Value)+m.size && int(m.off.Value) < o+n {
			return true
		}
	}
	return false
}
