//go:build linux && amd64

package tracer

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// VM is the KVM virtual machine a traced QEMU created: its process, memslots
// and vCPUs. The tracer thread writes it; any goroutine may read it.
type VM struct {
	log zerolog.Logger

	mu        sync.Mutex
	pid       int // the QEMU process (thread group) that owns the VM fd
	pidfd     int
	vmFD      int
	createdAt time.Time
	slots     memslotTable
	slotGen   atomic.Uint64 // bumped at every memslot table change
	vcpus     map[int]*VCPU // by vCPU id
	byTID     map[int]*VCPU
	changed   chan struct{}             // closed and replaced at every change
	changes   atomic.Uint64             // counts changes (Changes)
	detached  atomic.Bool               // Tracer.Detach: the tracer is letting go
	board     atomic.Pointer[RegsBoard] // Publish: snapshots go there too

	// injectFunc runs system calls as QEMU on a thread, with the other
	// threads frozen if asked (Tracer.injectFunc).
	injectFunc func(ctx context.Context, pid, tid int, freeze bool, fn func(run runFunc) error) error
	// guarded reports whether a guest-physical range touches a page the
	// guard protects, and writeGuarded writes one (guard.go).
	guarded      func(gpa, size uint64) bool
	writeGuarded func(ctx context.Context, gpa uint64, b []byte) error
}

// Guarded reports whether guest-physical gpa..gpa+size touches a page the
// guard protects (Tracer.Protect): host writes there must go through
// WriteGuarded, because QEMU's mapping of the page is read-only.
func (v *VM) Guarded(gpa, size uint64) bool { return v.guarded != nil && v.guarded(gpa, size) }

// WriteGuarded writes b at gpa where Guarded says the guard protects it,
// past QEMU's read-only mapping of the page (Tracer.writeGuarded).
func (v *VM) WriteGuarded(ctx context.Context, gpa uint64, b []byte) error {
	if v.writeGuarded == nil {
		return errors.New("no guard")
	}
	return v.writeGuarded(ctx, gpa, b)
}

// VCPU is one captured vCPU.
type VCPU struct {
	ID  int // the vCPU id QEMU passed to KVM_CREATE_VCPU (the APIC id)
	TID int // the QEMU thread that created it and runs KVM_RUN for it
	FD  int // QEMU's fd number for it

	run *kvmRun

	mu      sync.Mutex
	gone    bool
	seq     uint64
	regs    SyncRegs
	at      time.Time
	updated chan struct{} // closed and replaced at every snapshot

	msrs   map[uint32]uint64 // the guest MSRs KVM last reported to QEMU
	msrsAt time.Time
	// qemuHolds are the MSRs QEMU read (KVM_GET_MSRS, a state sync) and
	// has not written back yet (KVM_SET_MSRS before its next KVM_RUN):
	// a write of ours to one would be undone by QEMU's (msrs.go).
	qemuHolds map[uint32]bool
}

// VCPUInfo describes a vCPU without its registers.
type VCPUInfo struct {
	ID  int `json:"id"`
	TID int `json:"tid"`
	FD  int `json:"fd"`
}

func newVM(log zerolog.Logger) *VM {
	return &VM{log: log, pidfd: -1, slots: memslotTable{}, vcpus: map[int]*VCPU{}, byTID: map[int]*VCPU{}, changed: make(chan struct{})}
}

// Pid is the QEMU process that owns the VM, or 0 before KVM_CREATE_VM.
func (v *VM) Pid() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.pid
}

// Memslots returns the current memslot table.
func (v *VM) Memslots() []Memslot {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.slots.sorted()
}

// MemslotGen changes whenever the memslot table does, so readers can cache
// what they derive from Memslots.
func (v *VM) MemslotGen() uint64 { return v.slotGen.Load() }

// VCPUs lists the captured vCPUs ordered by id.
func (v *VM) VCPUs() []VCPUInfo {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := make([]VCPUInfo, 0, len(v.vcpus))
	for _, c := range v.vcpus {
		out = append(out, VCPUInfo{ID: c.ID, TID: c.TID, FD: c.FD})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Wait blocks until cond holds for the VM or ctx ends.
func (v *VM) Wait(ctx context.Context, cond func(*VM) bool) error {
	for {
		v.mu.Lock()
		ch := v.changed
		v.mu.Unlock()
		if cond(v) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Publish makes every register snapshot from now on also go to board, for
// another process to read (RegsBoard.Sample).
func (v *VM) Publish(board *RegsBoard) { v.board.Store(board) }

// Changes counts the changes Wait wakes for (VM created, vCPU captured,
// memslot set): a reader that remembers it knows whether anything it
// copied may be stale.
func (v *VM) Changes() uint64 { return v.changes.Load() }

// notify wakes Wait callers. Precondition: v.mu held.
func (v *VM) notify() {
	v.changes.Add(1)
	close(v.changed)
	v.changed = make(chan struct{})
}

// created records a successful KVM_CREATE_VM by thread tid.
func (v *VM) created(tid, vmFD int) {
	pid := tgidOf(tid)
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		v.log.Error().Err(err).Int("pid", pid).Msg("pidfd_open on QEMU; vCPUs will not be captured")
		pidfd = -1
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.pid != 0 {
		// A second VM in the same QEMU (accelerator probing does this):
		// follow the newest.
		v.log.Info().Int("old_vm_fd", v.vmFD).Int("vm_fd", vmFD).Msg("QEMU created another VM; following the new one")
		v.reset()
	}
	v.pid, v.pidfd, v.vmFD, v.createdAt = pid, pidfd, vmFD, time.Now()
	v.log.Info().Int("pid", pid).Int("vm_fd", vmFD).Msg("KVM_CREATE_VM")
	v.notify()
}

// reset forgets the current VM. Precondition: v.mu held.
func (v *VM) reset() {
	for _, c := range v.vcpus {
		c.close()
	}
	if v.pidfd >= 0 {
		unix.Close(v.pidfd)
	}
	v.pidfd = -1
	v.slots = memslotTable{}
	v.slotGen.Add(1)
	v.vcpus = map[int]*VCPU{}
	v.byTID = map[int]*VCPU{}
}

// vcpuCreated records a successful KVM_CREATE_VCPU(vmFD, id) = fd by tid.
func (v *VM) vcpuCreated(tid, vmFD, id, fd int) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if vmFD != v.vmFD || v.pidfd < 0 {
		return
	}
	run, err := mapVCPU(v.pidfd, fd)
	if err != nil {
		v.log.Error().Err(err).Int("vcpu", id).Msg("capture vCPU")
		return
	}
	c := &VCPU{ID: id, TID: tid, FD: fd, run: run, updated: make(chan struct{})}
	v.vcpus[id] = c
	v.byTID[tid] = c
	v.log.Info().Int("vcpu", id).Int("tid", tid).Int("fd", fd).Msg("KVM_CREATE_VCPU captured")
	v.notify()
}

// memslotSet applies a successful KVM_SET_USER_MEMORY_REGION(2) on vmFD.
func (v *VM) memslotSet(vmFD int, m Memslot) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if vmFD != v.vmFD {
		return
	}
	v.slots.apply(m)
	v.slotGen.Add(1)
	v.log.Debug().Uint32("slot", m.Slot).Uint64("gpa", m.GPA).Uint64("size", m.Size).Uint32("flags", m.Flags).Msg("memslot")
	v.notify()
}

// isVCPUFD reports whether fd is a vCPU fd of the VM.
func (v *VM) isVCPUFD(fd int) bool {
	return v.vcpuByFD(fd) != nil
}

func (v *VM) vcpuByFD(fd int) *VCPU {
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, c := range v.vcpus {
		if c.FD == fd {
			return c
		}
	}
	return nil
}

// vcpu is the captured vCPU id and the QEMU process that runs it, or
// ErrNoVCPU.
func (v *VM) vcpu(id int) (*VCPU, int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	c := v.vcpus[id]
	if c == nil {
		return nil, 0, fmt.Errorf("vCPU %d: %w", id, ErrNoVCPU)
	}
	return c, v.pid, nil
}

// isVCPUThread reports whether tid created (and runs) a vCPU.
func (v *VM) isVCPUThread(tid int) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.byTID[tid] != nil
}

// threadExited marks the vCPU a thread ran, if any, as gone.
func (v *VM) threadExited(tid int) {
	v.mu.Lock()
	c := v.byTID[tid]
	v.mu.Unlock()
	if c != nil {
		c.mu.Lock()
		c.gone = true
		c.mu.Unlock()
	}
}

// snapshot copies the vCPU registers of thread tid. Called by the tracer
// thread while tid is stopped, so the copy is consistent.
func (v *VM) snapshot(tid int) {
	v.mu.Lock()
	c := v.byTID[tid]
	v.mu.Unlock()
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.regs = c.run.syncRegs()
	c.at = time.Now()
	c.seq++
	if b := v.board.Load(); b != nil {
		b.publish(c.ID, c.regs, c.at)
	}
	// Re-assert our request in case something cleared it (unless we
	// are letting go: Detach put QEMU's value back).
	if !v.detached.Load() {
		c.run.requestSyncRegs()
	}
	close(c.updated)
	c.updated = make(chan struct{})
}

func (c *VCPU) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gone = true
	c.run.close()
}

// Sample is a register snapshot of one vCPU.
type Sample struct {
	ID   int
	Regs SyncRegs
	At   time.Time
	// Fresh is true when the vCPU was made to exit and the registers were
	// copied while its thread was stopped. False means the vCPU did not
	// answer the kick (QEMU holds it outside KVM_RUN: paused VM, or busy
	// in device emulation) and Regs are what KVM stored at its last exit,
	// which is current for a vCPU that is not running.
	Fresh bool
}

// ErrNoVCPU is returned for a vCPU id that was not captured.
var ErrNoVCPU = errors.New("no such vCPU")

// kickTimeout bounds how long one kick waits for the vCPU to stop.
const kickTimeout = 50 * time.Millisecond

// kickUntil sends QEMU's own kick (SIGUSR1) to vCPU thread tid of pid, up
// to three times, until the wait that arm returns (armed before each kick,
// bounded by kickTimeout) sees the tracer's copy of the registers. It
// reports whether one did; an error is a kick that could not be sent or
// the end of ctx.
func kickUntil(ctx context.Context, pid, tid int, arm func() func(context.Context) bool) (bool, error) {
	for attempt := 0; attempt < 3; attempt++ {
		wait := arm()
		if err := unix.Tgkill(pid, tid, unix.SIGUSR1); err != nil {
			return false, fmt.Errorf("kick: %w", err)
		}
		if wait(ctx) {
			return true, nil
		}
		if err := ctx.Err(); err != nil {
			return false, err
		}
	}
	return false, nil
}

// Registers returns fresh registers of vCPU id: it kicks the vCPU thread with
// SIGUSR1, QEMU's own kick signal, which makes KVM_RUN return; the tracer
// copies the registers at the signal's delivery stop and re-injects the
// signal, so QEMU sees an ordinary kick.
func (v *VM) Registers(ctx context.Context, id int) (Sample, error) {
	c, pid, err := v.vcpu(id)
	if err != nil {
		return Sample{}, err
	}
	c.mu.Lock()
	gone := c.gone
	c.mu.Unlock()
	if gone {
		return Sample{}, fmt.Errorf("vCPU %d: its thread has exited", id)
	}
	var got Sample
	answered, err := kickUntil(ctx, pid, c.TID, func() func(context.Context) bool {
		c.mu.Lock()
		seq, ch := c.seq, c.updated
		c.mu.Unlock()
		return func(ctx context.Context) bool {
			timer := time.NewTimer(kickTimeout)
			defer timer.Stop()
			select {
			case <-ch:
				c.mu.Lock()
				got = Sample{ID: id, Regs: c.regs, At: c.at, Fresh: c.seq > seq}
				c.mu.Unlock()
				return true
			case <-ctx.Done():
			case <-timer.C:
			}
			return false
		}
	})
	if err != nil {
		return Sample{}, fmt.Errorf("vCPU %d: %w", id, err)
	}
	if answered {
		return got, nil
	}
	// Not running: what KVM stored at the last exit is the current state.
	return v.Stored(id)
}

// Stored returns the registers KVM stored in vCPU id's kvm_run at its last
// exit, without a kick (not Fresh): the current ones of a vCPU that QEMU
// holds outside KVM_RUN.
func (v *VM) Stored(id int) (Sample, error) {
	c, _, err := v.vcpu(id)
	if err != nil {
		return Sample{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gone {
		return Sample{}, fmt.Errorf("vCPU %d: its thread has exited", id)
	}
	return Sample{ID: id, Regs: c.run.syncRegs(), At: time.Now()}, nil
}
