//go:build linux && amd64

package handoff

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/rpc"
	"os"
	"sync"
	"time"

	"github.com/kvmscope/kvmscope/tracer"
)

// Keeper is the keeper's side: the tracer and the queues of what it
// reports while no analysis process may be listening (Append queues an
// event of the keeper's own).
type Keeper struct {
	t *tracer.Tracer
	*Queues
}

// Queues are the tracer's event sinks, made before the tracer exists
// (tracer.Options needs them at Attach); Keeper then joins them to it.
type Queues struct {
	events  *queue[Event]
	blocked *queue[tracer.BlockedWrite]
}

// NewQueues makes the queues; Events and Blocked go into tracer.Options.
func NewQueues() *Queues {
	return &Queues{events: newQueue[Event](4096), blocked: newQueue[tracer.BlockedWrite](4096)}
}

// Append is tracer.Events: the event waits, marshalled, for the analysis
// process, which appends it to the VM's event log.
func (q *Queues) Append(kind string, fields any) (uint64, error) {
	b, err := json.Marshal(fields)
	if err != nil {
		return 0, err
	}
	q.events.push(Event{Kind: kind, Fields: b})
	return 0, nil
}

// Blocked is tracer.Options.Blocked.
func (q *Queues) Blocked(w tracer.BlockedWrite) { q.blocked.push(w) }

// Keeper returns the keeper of t with these queues.
func (q *Queues) Keeper(t *tracer.Tracer) *Keeper {
	return &Keeper{t: t, Queues: q}
}

// Event is one event of the tracer's (tracer.Events).
type Event struct {
	Kind   string
	Fields json.RawMessage
}

// Serve answers one analysis process on conn until it hangs up or QEMU is
// gone. Pauses it holds when it goes are released: a dead analysis process
// never leaves QEMU stopped.
func (k *Keeper) Serve(conn net.Conn) {
	ctx, cancel := context.WithCancel(context.Background())
	s := &session{k: k, ctx: ctx, pauses: map[uint64]func(){}}
	srv := rpc.NewServer()
	if err := srv.RegisterName("Keeper", s); err != nil {
		panic(err) // the method set is fixed: a bug
	}
	// net/rpc waits for the calls in flight before ServeConn returns;
	// the pauses must not wait for a long poll: release them as soon as
	// the socket reads EOF.
	srv.ServeConn(&hangup{Conn: conn, f: func() { cancel(); s.releasePauses() }})
	cancel()
	s.releasePauses()
}

// hangup calls f once when a read of the connection fails.
type hangup struct {
	net.Conn
	once sync.Once
	f    func()
}

func (h *hangup) Read(p []byte) (int, error) {
	n, err := h.Conn.Read(p)
	if err != nil {
		h.once.Do(h.f)
	}
	return n, err
}

// session is what one analysis process may call (net/rpc's method form:
// exported, args, *reply, error).
type session struct {
	k   *Keeper
	ctx context.Context

	mu     sync.Mutex
	pauses map[uint64]func()
	next   uint64
}

func (s *session) releasePauses() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, resume := range s.pauses {
		resume()
		delete(s.pauses, id)
	}
}

// callCtx bounds one call: the analysis process's own deadline is not
// sent, so the keeper gives up on its own.
func (s *session) callCtx(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(s.ctx, d)
}

// Hello is the keeper's identity.
type Hello struct{ KeeperPid int }

func (s *session) Hello(_ struct{}, r *Hello) error {
	*r = Hello{KeeperPid: os.Getpid()}
	return nil
}

// State is the VM as the tracer sees it.
type State struct {
	Changes  uint64 // tracer.VM.Changes
	Pid      int    // tracer.VM.Pid
	QEMUPid  int
	Memslots []tracer.Memslot
	VCPUs    []tracer.VCPUInfo
	Done     bool // QEMU is gone
}

// MSRs are one vCPU's MSRs as KVM last reported them (tracer.VM.MSRs).
type MSRs struct {
	Vals map[uint32]uint64
	At   time.Time
}

func (s *session) state() State {
	vm := s.k.t.VM()
	st := State{Changes: vm.Changes(), Pid: vm.Pid(), QEMUPid: s.k.t.QEMUPid(), Memslots: vm.Memslots(), VCPUs: vm.VCPUs()}
	st.Done = s.done()
	return st
}

// Seen is the state a Watch caller has: Changes and QEMUPid.
type Seen struct {
	Changes uint64
	QEMUPid int
}

// Watch returns the state once it differs from seen (or after a while,
// unchanged), so the analysis process's copy follows memslot and vCPU
// changes, and QEMU's daemon after -daemonize, without asking at every
// read.
func (s *session) Watch(seen Seen, r *State) error {
	ctx, cancel := s.callCtx(10 * time.Second)
	defer cancel()
	vm := s.k.t.VM()
	for ctx.Err() == nil {
		// The process QEMU runs as changes with no VM change (a TCG
		// QEMU's -daemonize fork): look again every 100 ms.
		wctx, wcancel := context.WithTimeout(ctx, 100*time.Millisecond)
		err := vm.Wait(wctx, func(vm *tracer.VM) bool { return vm.Changes() != seen.Changes })
		wcancel()
		if err == nil || s.k.t.QEMUPid() != seen.QEMUPid || s.done() {
			break
		}
	}
	*r = s.state()
	return nil
}

func (s *session) done() bool {
	select {
	case <-s.k.t.Done():
		return true
	default:
		return false
	}
}

// Regs are fresh registers of a vCPU and its MSRs as KVM last reported
// them (what guestmem.Live asks for together).
type Regs struct {
	Sample tracer.Sample
	MSRs   MSRs
}

func (s *session) Registers(id int, r *Regs) error {
	ctx, cancel := s.callCtx(5 * time.Second)
	defer cancel()
	smp, err := s.k.t.VM().Registers(ctx, id)
	*r = s.regs(id, smp)
	return err
}

// regs is a Regs reply: smp, with what tracer.VM.MSRs holds for vCPU id.
func (s *session) regs(id int, smp tracer.Sample) Regs {
	r := Regs{Sample: smp}
	r.MSRs.Vals, r.MSRs.At = s.k.t.VM().MSRs(id)
	return r
}

// MSRArgs ask for MSRs of one vCPU.
type MSRArgs struct {
	ID      int
	Indices []uint32
}

// ReadMSRs has KVM read MSRs; the reply is what tracer.VM.MSRs holds then.
func (s *session) ReadMSRs(a MSRArgs, r *MSRs) error {
	ctx, cancel := s.callCtx(5 * time.Second)
	defer cancel()
	if _, err := s.k.t.VM().ReadMSRs(ctx, a.ID, a.Indices); err != nil {
		return err
	}
	// ReadMSRs recorded what it read there.
	r.Vals, r.At = s.k.t.VM().MSRs(a.ID)
	return nil
}

// SetRegs writes New over a vCPU's general registers if they still are
// Old (what Stored returned): the change was computed in the
// analysis process, and a func cannot cross the socket.
type SetRegs struct {
	ID       int
	Old, New tracer.KVMRegs
}

// RegsWritten are the registers before and after (tracer.VM.SetRegisters).
type RegsWritten struct{ Old, New tracer.KVMRegs }

// Stored is tracer.VM.Stored, with the vCPU's MSRs.
func (s *session) Stored(id int, r *Regs) error {
	smp, err := s.k.t.VM().Stored(id)
	*r = s.regs(id, smp)
	return err
}

func (s *session) SetRegisters(a SetRegs, r *RegsWritten) error {
	changed := false
	old, new, err := s.k.t.VM().SetRegisters(a.ID, func(regs *tracer.KVMRegs) {
		if *regs != a.Old {
			changed = true
			return
		}
		*regs = a.New
	})
	if err == nil && changed {
		err = fmt.Errorf("vCPU %d: its registers changed between read and write: %w", a.ID, tracer.ErrVCPUBusy)
	}
	*r = RegsWritten{Old: old, New: new}
	return err
}

// SetMSRs are MSR values to write to one vCPU (tracer.VM.SetMSRs), and
// the reply's values before and after.
type SetMSRs struct {
	ID       int
	Set      map[uint32]uint64
	Old, New map[uint32]uint64
}

func (s *session) SetMSRs(a SetMSRs, r *SetMSRs) error {
	ctx, cancel := s.callCtx(5 * time.Second)
	defer cancel()
	old, new, err := s.k.t.VM().SetMSRs(ctx, a.ID, a.Set)
	*r = SetMSRs{ID: a.ID, Old: old, New: new}
	return err
}

// Range is a guest-physical range.
type Range struct{ GPA, Size uint64 }

func (s *session) Guarded(a Range, r *bool) error {
	*r = s.k.t.VM().Guarded(a.GPA, a.Size)
	return nil
}

// Write is bytes to write at a guest-physical address.
type Write struct {
	GPA  uint64
	Data []byte
}

func (s *session) WriteGuarded(a Write, _ *struct{}) error {
	ctx, cancel := s.callCtx(10 * time.Second)
	defer cancel()
	return s.k.t.VM().WriteGuarded(ctx, a.GPA, a.Data)
}

// Pause stops QEMU (tracer.Tracer.Pause) and returns the pause's id for
// Resume.
func (s *session) Pause(_ struct{}, id *uint64) error {
	ctx, cancel := s.callCtx(5 * time.Second)
	defer cancel()
	resume, err := s.k.t.Pause(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		// The caller hung up while QEMU stopped: nobody would resume it.
		resume()
		return errors.New("the analysis process is gone")
	}
	s.next++
	s.pauses[s.next] = resume
	*id = s.next
	return nil
}

func (s *session) Resume(id uint64, _ *struct{}) error {
	s.mu.Lock()
	resume := s.pauses[id]
	delete(s.pauses, id)
	s.mu.Unlock()
	if resume == nil {
		return errors.New("no such pause")
	}
	resume()
	return nil
}

// Protect asks the guard to protect ranges.
type Protect struct {
	Ranges []tracer.GuardRange
	Opts   tracer.GuardOptions
}

func (s *session) Protect(a Protect, r *tracer.GuardStatus) error {
	ctx, cancel := s.callCtx(60 * time.Second)
	defer cancel()
	st, err := s.k.t.Protect(ctx, a.Ranges, a.Opts)
	*r = st
	return err
}

func (s *session) GuardStatus(_ struct{}, r *tracer.GuardStatus) error {
	*r = s.k.t.GuardStatus()
	return nil
}

// Take asks for a queue's next batch and acknowledges, by its number, the
// batch the caller has stored (queue.take).
type Take struct{ Ack uint64 }

// Events are what TakeEvents returns; No acknowledges them.
type Events struct {
	Events  []Event
	Dropped uint64
	No      uint64
}

// TakeEvents waits a while for the tracer's events and hands them over.
func (s *session) TakeEvents(a Take, r *Events) error {
	ctx, cancel := s.callCtx(10 * time.Second)
	defer cancel()
	r.Events, r.Dropped, r.No = s.k.events.take(ctx, a.Ack)
	return nil
}

// Blocked are what TakeBlocked returns; No acknowledges them.
type Blocked struct {
	Writes  []tracer.BlockedWrite
	Dropped uint64
	No      uint64
}

// TakeBlocked waits a while for the guard's reports and hands them over.
func (s *session) TakeBlocked(a Take, r *Blocked) error {
	ctx, cancel := s.callCtx(10 * time.Second)
	defer cancel()
	r.Writes, r.Dropped, r.No = s.k.blocked.take(ctx, a.Ack)
	return nil
}
