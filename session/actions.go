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

// ErrNoActions is a VM kvmscope cannot act inside.
var ErrNoActions = errors.New("actions inside the guest need QEMU's gdbstub through kvmscope's QMP socket, which kvmscope has for a VM under TCG only (KVM: not yet, docs/limitations.md)")

// ErrActionNotAllowed is an action asked of a VM kvmscope may not change.
var ErrActionNotAllowed = errors.New("actions inside the guest change it: they need a VM started with kvmscope run --allow-write")

// stub is QEMU's gdbstub, opened for one action: the breakpoints the
// action inserted are removed and the guest resumed when it closes.
type stub struct {
	*gdbstub.Conn
	q   guestmem.Commands
	dir string
	bps map[uint64]bool
}

// actionMonitor is the QMP connection actions go through, or why there
// is none: checked before anything else, the guest kernel included.
func (s *Session) actionMonitor() (guestmem.Commands, error) {
	src, err := s.machine.Source()
	if err != nil {
		return nil, err
	}
	m, ok := src.(monitored)
	if !ok {
		return nil, ErrNoActions
	}
	if !guestmem.CapabilitiesOf(src).Write {
		return nil, ErrActionNotAllowed
	}
	c := m.Commands()
	if c == nil {
		return nil, ErrNoActions // attached without a monitor
	}
	return c, nil
}

// openStub checks that the VM runs and that nobody else uses its gdbstub,
// then opens it on a private unix socket (`gdbserver unix:...`) and
// connects, which stops the VM.
func (s *Session) openStub(ctx context.Context) (*stub, error) {
	q, err := s.actionMonitor()
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
	return &stub{Conn: c, q: q, dir: dir, bps: map[uint64]bool{}}, nil
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

func (g *stub) insert(ctx context.Context, va uint64) error {
	if err := g.Breakpoint(ctx, va, true); err != nil {
		return err
	}
	g.bps[va] = true
	return nil
}

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
