package session

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/guestmem/gdbstub"
)

// monitored is a source that reads QEMU through QMP (guestmem.TCG): the
// way to QEMU's gdbstub, which actions inside the guest run through.
type monitored interface {
	Commands() guestmem.Commands
}

// MonitorMachine is a Machine that holds QEMU's monitor itself, for a
// source that does not read through it: a VM under KVM (guestmem.Live)
// launched with kvmscope run --allow-write, to which kvmscope adds a
// private QMP socket for these actions.
type MonitorMachine interface {
	// Commands is QEMU's monitor, nil while it does not answer (yet).
	Commands() guestmem.Commands
	// GuestDebugRefused says why QEMU's gdbstub could not stop this VM's
	// vCPUs under KVM, or nil: it sets breakpoints and steps with
	// KVM_SET_GUEST_DEBUG, which the ioctl policy kvmscope enforces on
	// QEMU may refuse, and which the host's KVM may not honour.
	GuestDebugRefused() error
}

// ErrNoActions is a VM kvmscope cannot act inside.
var ErrNoActions = errors.New("actions inside the guest need QEMU's gdbstub through a QMP socket of kvmscope's own, which kvmscope has only for a VM it launched (kvmscope run --allow-write, under TCG or KVM), not for an attached VM or a dump")

// ErrActionNotAllowed is an action asked of a VM kvmscope may not change.
var ErrActionNotAllowed = errors.New("actions inside the guest change it: they need a VM started with kvmscope run --allow-write")

// ErrWriteDuringAction is a memory or register write asked while an
// action inside the guest runs: QEMU's gdbstub then owns the vCPUs'
// registers (it puts them back with KVM_SET_REGS when the guest
// resumes), and a register written through kvm_run meanwhile would be
// loaded over, or under, the action's.
var ErrWriteDuringAction = errors.New("an action inside the guest (kvmscope kill) is running: writes of guest memory or registers are refused until it ends (try again)")

// stub is QEMU's gdbstub, opened for one action: the breakpoints the
// action inserted are removed and the guest resumed when it closes.
type stub struct {
	*gdbstub.Conn
	q   guestmem.Commands
	dir string
	bps map[uint64]bool
	// kvm: the guest runs under KVM, where QEMU's gdbstub sets
	// breakpoints and steps through KVM_SET_GUEST_DEBUG.
	kvm bool
}

// actionMonitor is the QMP connection actions go through, and whether
// the VM runs under KVM, or why there is none: checked before anything
// else, the guest kernel included.
func (s *Session) actionMonitor() (guestmem.Commands, bool, error) {
	src, err := s.machine.Source()
	if err != nil {
		return nil, false, err
	}
	var c guestmem.Commands
	_, kvm := src.(*guestmem.Live)
	mm, hasMM := s.machine.(MonitorMachine)
	if m, ok := src.(monitored); ok {
		c = m.Commands()
	} else if kvm && hasMM {
		c = mm.Commands()
	} else {
		return nil, false, ErrNoActions
	}
	if !guestmem.CapabilitiesOf(src).Write {
		return nil, false, ErrActionNotAllowed
	}
	if c == nil {
		if kvm {
			return nil, false, errors.New("QEMU's private QMP socket, which actions inside the guest go through, is not answering (yet)")
		}
		return nil, false, ErrNoActions // attached without a monitor
	}
	if kvm {
		if err := mm.GuestDebugRefused(); err != nil {
			return nil, false, err
		}
	}
	return c, kvm, nil
}

// beginAction marks an action inside the guest as running, unless a
// write is between its pause and its resume; endAction ends the mark.
func (s *Session) beginAction() error {
	s.exclMu.Lock()
	defer s.exclMu.Unlock()
	if s.writes > 0 {
		return errors.New("a write of guest memory or registers is in progress: actions inside the guest wait until it ends (try again)")
	}
	s.acting = true
	return nil
}

func (s *Session) endAction() {
	s.exclMu.Lock()
	s.acting = false
	s.exclMu.Unlock()
}

// openStub checks that the VM runs and that nobody else uses its gdbstub,
// then opens it on a private unix socket (`gdbserver unix:...`) and
// connects, which stops the VM.
func (s *Session) openStub(ctx context.Context) (*stub, error) {
	q, kvm, err := s.actionMonitor()
	if err != nil {
		return nil, err
	}
	running, status, err := guestmem.Status(ctx, q)
	if err != nil {
		return nil, err
	}
	if !running {
		return nil, fmt.Errorf("the VM is not running (%s): kvmscope acts only in a running guest, and would resume it", status)
	}
	// One gdbstub per QEMU: `gdbserver` would take over a debugger's
	// (QEMU's chardev "gdb", from -s, -gdb or an earlier gdbserver).
	chardevs, err := q.HMP(ctx, "info chardev")
	if err != nil {
		return nil, fmt.Errorf("HMP info chardev: %w", err)
	}
	for line := range strings.SplitSeq(chardevs, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "gdb:") {
			return nil, errors.New("QEMU serves a gdbstub already (chardev gdb): kvmscope does not take over a debugger's")
		}
	}
	dir, err := os.MkdirTemp("", "kvmscope-gdb-")
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "gdb.sock")
	if out, err := q.HMP(ctx, "gdbserver unix:"+path+",server=on,wait=off"); err != nil || strings.TrimSpace(out) != "" && !strings.Contains(out, "Waiting for gdb") {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("open QEMU's gdbstub: %v %s", err, strings.TrimSpace(out))
	}
	c, err := gdbstub.Dial(ctx, path)
	if err != nil {
		q.HMP(context.Background(), "gdbserver none")
		os.RemoveAll(dir)
		return nil, err
	}
	return &stub{Conn: c, q: q, dir: dir, bps: map[uint64]bool{}, kvm: kvm}, nil
}

// close removes every breakpoint and resumes the guest (`D`), then closes
// the gdbstub (`gdbserver none`), within a few seconds of its own: it
// runs when the action's time is up too.
func (g *stub) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := g.Detach(ctx)
	g.Conn.Close()
	if _, herr := g.q.HMP(ctx, "gdbserver none"); err == nil {
		err = herr
	}
	os.RemoveAll(g.dir)
	if err != nil {
		return fmt.Errorf("close QEMU's gdbstub: %w (QMP `cont` resumes a VM left stopped)", err)
	}
	return nil
}

// insert sets a breakpoint at va. It is a hardware breakpoint (Z1),
// under TCG and KVM alike, never an int3 (Z0): under KVM QEMU puts a
// software breakpoint into guest memory, through the physical page the
// address has in the stopped vCPU's page tables at that moment. For a
// user address that page is usually a shared file page (a program's or
// a library's text), so every process mapping it would trap, and one
// mapping it elsewhere (ASLR) would get a SIGTRAP from an int3 QEMU does
// not know; in the kernel's text it is a write kvmscope's own integrity
// check and the guard (which may make QEMU's mapping of the page
// read-only) would see. A hardware breakpoint is a debug register: the
// guest's memory never changes. QEMU gives each vCPU four (DR0-DR3);
// an action holds one at a time.
func (g *stub) insert(ctx context.Context, va uint64) error {
	if err := g.Breakpoint(ctx, va, true); err != nil {
		if g.kvm {
			return fmt.Errorf("QEMU's gdbstub could not set a hardware breakpoint at %#x, which under KVM it does with KVM_SET_GUEST_DEBUG (an ioctl policy that denies it logs a policy event): %w", va, err)
		}
		return err
	}
	g.bps[va] = true
	return nil
}

// stepPast moves thread, stopped at the breakpoint va, one instruction
// on, and lets the guest go on. Under TCG a step overrides breakpoints.
// Under KVM a hardware instruction breakpoint is a fault taken before
// the instruction runs, and only RFLAGS.RF lets the instruction past it,
// which neither kvmscope nor QEMU's gdbstub sets: the breakpoint is
// removed for the step, as gdb does, and put back after. Meanwhile the
// other vCPUs run without it, which costs at most a stop missed.
func (g *stub) stepPast(ctx context.Context, thread int, va uint64) error {
	if !g.kvm {
		return g.Step(ctx, thread)
	}
	if err := g.Breakpoint(ctx, va, false); err != nil {
		return err
	}
	if err := g.Step(ctx, thread); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, stepWait)
	_, err := g.Wait(wctx)
	cancel()
	if err != nil {
		return fmt.Errorf("step past the breakpoint at %#x: %w", va, err)
	}
	if err := g.Breakpoint(ctx, va, true); err != nil {
		return err
	}
	return g.Continue(ctx)
}

// stepWait bounds one step under KVM.
const stepWait = 5 * time.Second

func (g *stub) remove(ctx context.Context, va uint64) error {
	if !g.bps[va] {
		return nil
	}
	delete(g.bps, va)
	return g.Breakpoint(ctx, va, false)
}

// reg reads register name of thread as a number.
func (g *stub) reg(ctx context.Context, thread int, name string) (uint64, error) {
	r, ok := g.Regs.Reg(name)
	if !ok {
		return 0, fmt.Errorf("QEMU's target.xml has no register %s", name)
	}
	b, err := g.ReadReg(ctx, thread, r)
	return gdbstub.U64(b), err
}

func (g *stub) setReg(ctx context.Context, thread int, name string, v uint64) error {
	r, ok := g.Regs.Reg(name)
	if !ok {
		return fmt.Errorf("QEMU's target.xml has no register %s", name)
	}
	return g.WriteReg(ctx, thread, r, gdbstub.PutU64(v, r.Bytes))
}

// userRegs are the registers an injected system call may change, and
// which are put back after it: the general registers, rip and eflags
// (syscall itself clobbers rcx and r11). Segments, the bases and the
// control registers are the kernel's, which sysret restores.
var userRegs = []string{"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "eflags"}

// saved is a thread's registers, raw, as read.
type saved map[string][]byte

func (g *stub) save(ctx context.Context, thread int) (saved, error) {
	out := saved{}
	for _, n := range userRegs {
		r, ok := g.Regs.Reg(n)
		if !ok {
			return nil, fmt.Errorf("QEMU's target.xml has no register %s", n)
		}
		b, err := g.ReadReg(ctx, thread, r)
		if err != nil {
			return nil, err
		}
		out[n] = b
	}
	return out, nil
}

// restore writes back every saved register that differs now.
func (g *stub) restore(ctx context.Context, thread int, sv saved) error {
	for _, n := range userRegs {
		r, _ := g.Regs.Reg(n)
		b, err := g.ReadReg(ctx, thread, r)
		if err != nil {
			return err
		}
		if string(b) == string(sv[n]) {
			continue
		}
		if err := g.WriteReg(ctx, thread, r, sv[n]); err != nil {
			return err
		}
	}
	return nil
}
