package introspect

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/guestmem"
)

// Forged guest memory for the task walker and the solver: the fuzz input
// is mapped as kernel image at fuzzBase (linear, no page tables), so every
// pointer in it can point anywhere in it.
const (
	fuzzBase = 0xffffffff81000000
	// Small inputs keep the fuzzer's minimization quick; task windows
	// may overlap the next task, as the solver allows.
	fuzzMax   = 1 << 14
	fuzzTask  = 0x400  // stride of the forged task_structs in the seeds
	fuzzMods  = 0x3000 // offset of the forged modules list head
	fTasks    = 0x100
	fPID      = 0x180
	fParent   = 0x190
	fCred     = 0x1c0
	fComm     = 0x200
	fSignal   = 0x300
	fThreadNd = 0x310
)

// forgedMem is guest physical memory held in a byte slice.
type forgedMem []byte

func (m forgedMem) Regions() []guestmem.Region {
	return []guestmem.Region{{GPA: 0, Size: uint64(len(m))}}
}

func (m forgedMem) ReadAt(p []byte, gpa int64) (int, error) {
	if gpa < 0 || gpa >= int64(len(m)) {
		return 0, &guestmem.HoleError{GPA: uint64(gpa)}
	}
	n := copy(p, m[gpa:])
	if n < len(p) {
		return n, &guestmem.HoleError{GPA: uint64(gpa) + uint64(n)}
	}
	return n, nil
}

func fuzzKernel(mem []byte) *Kernel {
	return &Kernel{Mem: forgedMem(mem), imageSize: uint64(len(mem)),
		Record: Record{TextVA: fuzzBase, Levels: 4, PageOffsetBase: 0xffff888000000000}}
}

// fuzzOffsets is the layout of the forged task_structs.
func fuzzOffsets() *Offsets {
	s := func(v int) Offset { return Offset{Value: int64(v), Source: SourceSolved} }
	return &Offsets{
		TaskTasks: s(fTasks), TaskPID: s(fPID), TaskTGID: s(fPID + 4), TaskRealParent: s(fParent),
		TaskParent: s(fParent + 8), TaskMM: s(0x1a0), TaskRealCred: s(fCred), TaskCred: s(fCred + 8),
		TaskComm: s(fComm), TaskFlags: s(0x2c), TaskState: s(0x18), TaskStartTime: s(0x1b0),
		TaskSignal: s(fSignal), TaskThreadNode: s(fThreadNd), SignalThreadHd: s(0x10),
		CredUID: s(8), CredGID: s(12), CredEUID: s(24), CredEGID: s(28), MMPgd: s(0x48),
		MMArgStart: s(0x138), MMArgEnd: s(0x140),
		ModuleList: s(8), ModuleName: s(24), ModuleState: s(0), ModuleBase: s(0x140), ModuleSize: s(0x148),
	}
}

// forgedTasks builds n tasks linked on the tasks list and each on its own
// thread list, named like a booted system, with the modules list empty.
func forgedTasks(n int) []byte {
	mem := make([]byte, max(fuzzTask*n+0x1000, fuzzMods+16))
	put := func(off int, v uint64) { binary.LittleEndian.PutUint64(mem[off:], v) }
	put32 := func(off int, v uint32) { binary.LittleEndian.PutUint32(mem[off:], v) }
	va := func(off int) uint64 { return fuzzBase + uint64(off) }
	names := []string{"swapper/0", "init", "kthreadd", "sleep", "sh"}
	for i := range n {
		b := i * fuzzTask
		next, prev := ((i+1)%n)*fuzzTask, ((i+n-1)%n)*fuzzTask
		put(b+fTasks, va(next+fTasks))
		put(b+fTasks+8, va(prev+fTasks))
		put32(b+fPID, uint32(i))
		put32(b+fPID+4, uint32(i))
		put(b+fParent, va(0))
		put(b+fParent+8, va(0))
		copy(mem[b+fComm:], names[min(i, len(names)-1)])
		// signal points at 0x380 in the task; its thread_head there
		// (+0x10) and the task's thread_node form a two-entry list.
		sig := b + 0x380
		put(b+fSignal, va(sig))
		put(b+fThreadNd, va(sig+0x10))
		put(b+fThreadNd+8, va(sig+0x10))
		put(sig+0x10, va(b+fThreadNd))
		put(sig+0x18, va(b+fThreadNd))
		put(b+fCred, va(b+0x3c0))
		put(b+fCred+8, va(b+0x3c0))
	}
	put(fuzzMods, va(fuzzMods))
	put(fuzzMods+8, va(fuzzMods))
	return mem
}

// fuzzSeeds are forged task lists: a good one, a list that loops among
// its nodes without coming back to the head, a node pointing to itself,
// one thread list shared by every task, and empty memory.
func fuzzSeeds(f *testing.F) {
	f.Add(forgedTasks(5))
	cyc := forgedTasks(5)
	binary.LittleEndian.PutUint64(cyc[4*fuzzTask+fTasks:], fuzzBase+2*fuzzTask+fTasks)
	f.Add(cyc)
	self := forgedTasks(3)
	binary.LittleEndian.PutUint64(self[fuzzTask+fTasks:], fuzzBase+fuzzTask+fTasks)
	f.Add(self)
	shared := forgedTasks(6)
	for i := range 6 {
		binary.LittleEndian.PutUint64(shared[i*fuzzTask+fSignal:], fuzzBase+0x380)
	}
	f.Add(shared)
	f.Add([]byte{})
	f.Add(make([]byte, 0x1000))
}

func fuzzMemory(data []byte) *Kernel {
	if len(data) > fuzzMax {
		data = data[:fuzzMax]
	}
	mem := make([]byte, max(len(data), fuzzMods+16))
	copy(mem, data)
	return fuzzKernel(mem)
}

// FuzzTasks runs the task, thread and module walkers on forged memory:
// they must end in bounded time, with an error or a bounded list.
//
// Deleting bytes moves every forged structure, so the fuzzer's
// minimization rarely shrinks an input and spends its full default 60 s
// on each new one: run with -fuzzminimizetime=2s.
func FuzzTasks(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		k := fuzzMemory(data)
		ps, err := processes(k, fuzzOffsets(), fuzzBase, ProcessOptions{Threads: true})
		if err == nil && len(ps) > 3*maxTasks {
			t.Fatalf("%d processes from %d bytes", len(ps), len(data))
		}
		modulesAt(k, fuzzOffsets(), fuzzBase+fuzzMods)
	})
}

// FuzzSolveOffsets runs the offsets solver on forged memory, then the
// walkers with whatever it found. A small budget keeps each run short; the
// full budget only scales the same bounded loops.
func FuzzSolveOffsets(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		k := fuzzMemory(data)
		off, _ := solveWithin(k, fuzzBase, fuzzBase+fuzzMods, 1<<10)
		if off != nil && off.TaskTasks.Known() {
			processes(k, off, fuzzBase, ProcessOptions{Threads: true})
		}
	})
}

// TestForgedTasks checks the walker on the forged seeds: the good list is
// read in full, the cyclic ones end with an error.
func TestForgedTasks(t *testing.T) {
	k := fuzzKernel(forgedTasks(5))
	ps, err := processes(k, fuzzOffsets(), fuzzBase, ProcessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 5 || ps[1].Comm != "init" || ps[1].PID != 1 || ps[4].Threads != 1 {
		t.Fatalf("forged tasks read as %+v", ps)
	}
	cyc := forgedTasks(5)
	binary.LittleEndian.PutUint64(cyc[4*fuzzTask+fTasks:], fuzzBase+2*fuzzTask+fTasks)
	if _, err := processes(fuzzKernel(cyc), fuzzOffsets(), fuzzBase, ProcessOptions{}); err == nil {
		t.Fatal("a list that does not return to init_task was accepted")
	}
	ms, err := modulesAt(k, fuzzOffsets(), fuzzBase+fuzzMods)
	if err != nil || len(ms) != 0 {
		t.Fatalf("empty modules list: %v, %v", ms, err)
	}
	// The solver finds the forged layout's comm and tasks.
	off, _ := solveOffsets(k, fuzzBase, fuzzBase+fuzzMods)
	if off == nil || off.TaskComm.Value != fComm || off.TaskTasks.Value != fTasks {
		t.Fatalf("solver on forged tasks: %+v", off)
	}
}

// TestSolverNeverGuesses checks that the solver stops with the candidates
// when the constraints leave more than one offset: here a copy of every
// pid elsewhere in the forged tasks.
func TestSolverNeverGuesses(t *testing.T) {
	mem := forgedTasks(5)
	for i := range 5 {
		binary.LittleEndian.PutUint32(mem[i*fuzzTask+0x240:], uint32(i))
	}
	off, err := solveOffsets(fuzzKernel(mem), fuzzBase, fuzzBase+fuzzMods)
	if err == nil || !errors.Is(err, ErrAmbiguous) {
		t.Fatalf("solver chose among equal candidates: %+v, err %v", off, err)
	}
	for _, want := range []string{"task_struct.pid", "0x180", "0x184", "0x240"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	var ue *UnsolvedError
	if !errors.As(err, &ue) {
		t.Errorf("error %T is not an *UnsolvedError", err)
	}
}
