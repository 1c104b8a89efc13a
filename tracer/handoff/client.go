//go:build linux && amd64

package handoff

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/rpc"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kvmscope/kvmscope/tracer"
)

// Client is the analysis process's side: the VM as the keeper's tracer
// sees it, kept current by a long poll, and the tracer's operations as
// calls. It serves guestmem.Live as the tracer's VM does in one process.
type Client struct {
	rpc   *rpc.Client
	hello Hello

	state   atomic.Pointer[State]
	board   *tracer.RegsBoard // UseBoard
	msrsMu  sync.Mutex
	msrs    map[int]MSRs  // by vCPU id, as the last Registers or ReadMSRs brought them
	done    chan struct{} // closed when QEMU is gone or the keeper hung up
	doneErr error
	once    sync.Once

	// The numbers of the last batches TakeEvents and TakeBlocked took,
	// which their next calls acknowledge (each has one caller).
	eventsNo, blockedNo uint64
}

// Dial starts talking to the keeper on conn and fetches the VM's state.
func Dial(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{rpc: rpc.NewClient(conn), done: make(chan struct{}), msrs: map[int]MSRs{}}
	if err := c.call(ctx, "Hello", struct{}{}, &c.hello); err != nil {
		c.rpc.Close()
		return nil, fmt.Errorf("keeper: %w", err)
	}
	var st State
	if err := c.call(ctx, "Watch", Seen{Changes: ^uint64(0)}, &st); err != nil {
		c.rpc.Close()
		return nil, fmt.Errorf("keeper: %w", err)
	}
	c.state.Store(&st)
	go c.watch()
	return c, nil
}

// watch follows the keeper's state until QEMU is gone or the keeper hangs
// up.
func (c *Client) watch() {
	for {
		cur := c.state.Load()
		if cur.Done {
			c.end(nil)
			return
		}
		var st State
		if err := c.rpc.Call("Keeper.Watch", Seen{Changes: cur.Changes, QEMUPid: cur.QEMUPid}, &st); err != nil {
			c.end(err)
			return
		}
		c.state.Store(&st)
	}
}

func (c *Client) end(err error) {
	c.once.Do(func() {
		c.doneErr = err
		close(c.done)
	})
}

// Done is closed when QEMU is gone or the keeper hung up; Err then says
// which (nil: QEMU is gone).
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why Done closed (valid after it has).
func (c *Client) Err() error { return c.doneErr }

// Close hangs up.
func (c *Client) Close() error { return c.rpc.Close() }

// KeeperPid is the keeper's (the tracer's) process.
func (c *Client) KeeperPid() int { return c.hello.KeeperPid }

// call runs one call, given up on (not cancelled: the keeper bounds its
// own work) when ctx ends.
func (c *Client) call(ctx context.Context, method string, args, reply any) error {
	call := c.rpc.Go("Keeper."+method, args, reply, make(chan *rpc.Call, 1))
	select {
	case <-call.Done:
		return remoteErr(call.Error)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// sentinels are the tracer's errors callers test with errors.Is; net/rpc
// carries only their text.
var sentinels = []error{tracer.ErrNoVCPU, tracer.ErrGuardTCG, tracer.ErrVCPUBusy}

func remoteErr(err error) error {
	var se rpc.ServerError
	if !errors.As(err, &se) {
		if errors.Is(err, rpc.ErrShutdown) {
			return errors.New("the tracer's process is gone")
		}
		return err
	}
	for _, s := range sentinels {
		if strings.Contains(string(se), s.Error()) {
			return &wrapped{msg: string(se), is: s}
		}
	}
	return errors.New(string(se))
}

type wrapped struct {
	msg string
	is  error
}

func (w *wrapped) Error() string { return w.msg }
func (w *wrapped) Unwrap() error { return w.is }

// Pid is the QEMU process that owns the KVM VM, or 0 before KVM_CREATE_VM.
func (c *Client) Pid() int { return c.state.Load().Pid }

// QEMUPid is QEMU's process, KVM VM or not (tracer.Tracer.QEMUPid).
func (c *Client) QEMUPid() int { return c.state.Load().QEMUPid }

// Memslots is the memslot table.
func (c *Client) Memslots() []tracer.Memslot { return c.state.Load().Memslots }

// MemslotGen changes whenever the state does.
func (c *Client) MemslotGen() uint64 { return c.state.Load().Changes }

// VCPUs lists the captured vCPUs.
func (c *Client) VCPUs() []tracer.VCPUInfo { return c.state.Load().VCPUs }

// MSRs are vCPU id's MSRs as KVM last reported them, as of the last
// Registers or ReadMSRs of that vCPU (guestmem.Live asks right after
// Registers).
func (c *Client) MSRs(id int) (map[uint32]uint64, time.Time) {
	c.msrsMu.Lock()
	defer c.msrsMu.Unlock()
	m := c.msrs[id]
	return m.Vals, m.At
}

func (c *Client) keepMSRs(id int, m MSRs) {
	c.msrsMu.Lock()
	defer c.msrsMu.Unlock()
	c.msrs[id] = m
}

// UseBoard has Registers kick vCPUs itself and read the copies the
// keeper's tracer publishes on board (tracer.RegsBoard), instead of
// asking the keeper: a register read then costs no round trip.
func (c *Client) UseBoard(board *tracer.RegsBoard) { c.board = board }

// Registers are fresh registers of vCPU id (tracer.VM.Registers): from
// the board when there is one and the vCPU answers its kick, else from the
// keeper.
func (c *Client) Registers(ctx context.Context, id int) (tracer.Sample, error) {
	method := "Registers"
	if c.board != nil {
		st := c.state.Load()
		for _, v := range st.VCPUs {
			if v.ID != id {
				continue
			}
			s, ok, err := c.board.Sample(ctx, st.Pid, v.TID, id)
			if err != nil {
				return s, fmt.Errorf("vCPU %d: %w", id, err)
			}
			if ok {
				return s, nil
			}
			// Kicked three times without an answer: QEMU holds the
			// vCPU outside KVM_RUN, and kvm_run has its registers.
			method = "Stored"
		}
	}
	var r Regs
	err := c.call(ctx, method, id, &r)
	if err == nil {
		c.keepMSRs(id, r.MSRs)
	}
	return r.Sample, err
}

// ReadMSRs has KVM read MSRs of vCPU id (tracer.VM.ReadMSRs).
func (c *Client) ReadMSRs(ctx context.Context, id int, indices []uint32) (map[uint32]uint64, error) {
	var m MSRs
	if err := c.call(ctx, "ReadMSRs", MSRArgs{ID: id, Indices: indices}, &m); err != nil {
		return nil, err
	}
	c.keepMSRs(id, m)
	out := make(map[uint32]uint64, len(indices))
	for _, i := range indices {
		if v, ok := m.Vals[i]; ok {
			out[i] = v
		}
	}
	return out, nil
}

// Refresh fetches the keeper's state now, so what follows sees every
// change made before (QEMU's daemon after -daemonize), not only those
// the long poll has brought.
func (c *Client) Refresh(ctx context.Context) {
	var st State
	if c.call(ctx, "Watch", Seen{Changes: ^uint64(0)}, &st) == nil && st.Changes >= c.state.Load().Changes {
		c.state.Store(&st)
	}
}

// SetRegisters changes vCPU id's general registers
// (tracer.VM.SetRegisters): change runs here on the registers the keeper
// holds, and the keeper writes the result if they have not changed
// meanwhile (QEMU is paused: they do not).
func (c *Client) SetRegisters(id int, change func(*tracer.KVMRegs)) (old, new tracer.KVMRegs, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var stored Regs
	if err := c.call(ctx, "Stored", id, &stored); err != nil {
		return old, new, err
	}
	cur := stored.Sample.Regs.Regs
	want := cur
	change(&want)
	var r RegsWritten
	err = c.call(ctx, "SetRegisters", SetRegs{ID: id, Old: cur, New: want}, &r)
	return r.Old, r.New, err
}

// SetMSRs writes MSRs of vCPU id (tracer.VM.SetMSRs).
func (c *Client) SetMSRs(ctx context.Context, id int, set map[uint32]uint64) (old, new map[uint32]uint64, err error) {
	var r SetMSRs
	err = c.call(ctx, "SetMSRs", SetMSRs{ID: id, Set: set}, &r)
	return r.Old, r.New, err
}

// Guarded reports whether the guard protects any of gpa..gpa+size. A keeper
// that does not answer is taken to guard it, so the write goes the
// keeper's way and fails there rather than landing on a read-only mapping.
func (c *Client) Guarded(gpa, size uint64) bool {
	var r bool
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.call(ctx, "Guarded", Range{GPA: gpa, Size: size}, &r); err != nil {
		return true
	}
	return r
}

// WriteGuarded writes past the guard (tracer.VM.WriteGuarded).
func (c *Client) WriteGuarded(ctx context.Context, gpa uint64, b []byte) error {
	return c.call(ctx, "WriteGuarded", Write{GPA: gpa, Data: b}, &struct{}{})
}

// Pause stops QEMU (tracer.Tracer.Pause). If the keeper or this process
// dies while paused, the keeper resumes QEMU.
func (c *Client) Pause(ctx context.Context) (func(), error) {
	var id uint64
	call := c.rpc.Go("Keeper.Pause", struct{}{}, &id, make(chan *rpc.Call, 1))
	select {
	case <-call.Done:
		if call.Error != nil {
			return nil, remoteErr(call.Error)
		}
	case <-ctx.Done():
		// The pause may still succeed: undo it then.
		go func() {
			if <-call.Done; call.Error == nil {
				c.rpc.Call("Keeper.Resume", id, &struct{}{})
			}
		}()
		return nil, ctx.Err()
	}
	var once sync.Once
	return func() {
		once.Do(func() { c.rpc.Call("Keeper.Resume", id, &struct{}{}) })
	}, nil
}

// Protect asks the guard to protect ranges (tracer.Tracer.Protect).
func (c *Client) Protect(ctx context.Context, ranges []tracer.GuardRange, opts tracer.GuardOptions) (tracer.GuardStatus, error) {
	var st tracer.GuardStatus
	err := c.call(ctx, "Protect", Protect{Ranges: ranges, Opts: opts}, &st)
	return st, err
}

// GuardStatus is what the guard protects (zero when the keeper does not
// answer).
func (c *Client) GuardStatus() tracer.GuardStatus {
	var st tracer.GuardStatus
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c.call(ctx, "GuardStatus", struct{}{}, &st)
	return st
}

// TakeEvents waits (up to seconds) for the tracer's events and takes them.
// Calling it again says the caller has stored the ones it returned; until
// then the keeper keeps them for the next analysis process. One goroutine
// calls it.
func (c *Client) TakeEvents(ctx context.Context) (Events, error) {
	var r Events
	err := c.call(ctx, "TakeEvents", Take{Ack: c.eventsNo}, &r)
	if err == nil && r.No != 0 {
		c.eventsNo = r.No
	}
	return r, err
}

// TakeBlocked waits (up to seconds) for the guard's reports and takes
// them, like TakeEvents.
func (c *Client) TakeBlocked(ctx context.Context) (Blocked, error) {
	var r Blocked
	err := c.call(ctx, "TakeBlocked", Take{Ack: c.blockedNo}, &r)
	if err == nil && r.No != 0 {
		c.blockedNo = r.No
	}
	return r, err
}
