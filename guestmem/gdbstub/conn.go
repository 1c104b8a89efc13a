package gdbstub

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// Conn is one connection to a gdbstub. It is not safe for concurrent use.
type Conn struct {
	c    net.Conn
	r    *bufio.Reader
	Regs *Layout // from target.xml, read by Dial
	// synced are the threads whose state QEMU has fetched from KVM since
	// the guest last ran (selectThread).
	synced map[int]bool
}

// Dial connects to the gdbstub on the unix socket path, retrying until
// ctx ends (QEMU listens right after `gdbserver`), and reads target.xml:
// QEMU answers `p`/`P` only once the client has read it (gdb_has_xml).
// Connecting stops the VM (QEMU's gdbstub does vm_stop on connect).
func Dial(ctx context.Context, path string) (*Conn, error) {
	var nc net.Conn
	for {
		var d net.Dialer
		var err error
		if nc, err = d.DialContext(ctx, "unix", path); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to the gdbstub at %s: %w", path, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	c := &Conn{c: nc, r: bufio.NewReaderSize(nc, 4096), synced: map[int]bool{}}
	if _, err := c.Command(ctx, "qSupported:xmlRegisters=i386"); err != nil {
		nc.Close()
		return nil, err
	}
	l, err := readLayout(ctx, c)
	if err != nil {
		nc.Close()
		return nil, err
	}
	c.Regs = l
	return c, nil
}

// Close closes the connection (it does not resume the guest: Detach does).
func (c *Conn) Close() error { return c.c.Close() }

func (c *Conn) deadline(ctx context.Context) {
	if dl, ok := ctx.Deadline(); ok {
		c.c.SetDeadline(dl)
	} else {
		c.c.SetDeadline(time.Time{})
	}
}

// send writes one packet and waits for its ack, retransmitting on '-'
// (at most 3 times).
func (c *Conn) send(ctx context.Context, payload string) error {
	c.deadline(ctx)
	pkt := encode(payload)
	for try := 0; try < 3; try++ {
		if _, err := c.c.Write(pkt); err != nil {
			return fmt.Errorf("gdbstub: send %.20q: %w", payload, err)
		}
	ack:
		b, err := c.r.ReadByte()
		if err != nil {
			return fmt.Errorf("gdbstub: ack of %.20q: %w", payload, err)
		}
		switch b {
		case '+':
			return nil
		case '-':
			continue
		case '$':
			// A packet QEMU sent on its own: the stop reply it sends
			// when the VM stops while a client is connected (QEMU stops
			// it when one connects). Acked and dropped: the caller asks
			// with `?` when it needs to know.
			c.r.UnreadByte()
			if _, err := c.recv(ctx); err != nil {
				return err
			}
			goto ack
		default:
			return fmt.Errorf("%w: %q instead of an ack", ErrPacket, b)
		}
	}
	return fmt.Errorf("gdbstub: %.20q refused 3 times", payload)
}

// recv reads one packet and acks it ('-' and again on a bad checksum,
// at most 3 times).
func (c *Conn) recv(ctx context.Context) (string, error) {
	c.deadline(ctx)
	for try := 0; try < 3; try++ {
		p, err := readPacket(c.r)
		if errors.Is(err, ErrChecksum) {
			c.c.Write([]byte{'-'})
			continue
		}
		if err != nil {
			return "", fmt.Errorf("gdbstub: %w", err)
		}
		if _, err := c.c.Write([]byte{'+'}); err != nil {
			return "", fmt.Errorf("gdbstub: ack: %w", err)
		}
		return string(p), nil
	}
	return "", ErrChecksum
}

// Command sends one packet and returns the reply. "E NN" replies are
// errors.
func (c *Conn) Command(ctx context.Context, payload string) (string, error) {
	if err := c.send(ctx, payload); err != nil {
		return "", err
	}
	reply, err := c.recv(ctx)
	if err != nil {
		return "", err
	}
	if len(reply) == 3 && reply[0] == 'E' {
		return "", fmt.Errorf("gdbstub: %.20q: error %s", payload, reply[1:])
	}
	return reply, nil
}

// ok runs a command whose reply must be "OK".
func (c *Conn) ok(ctx context.Context, payload string) error {
	reply, err := c.Command(ctx, payload)
	if err != nil {
		return err
	}
	if reply != "OK" {
		return fmt.Errorf("gdbstub: %.20q: reply %.40q, want OK", payload, reply)
	}
	return nil
}

// Stop is a stop reply: the signal and the thread (vCPU) that stopped.
type Stop struct {
	Signal int
	Thread int // 0 when the reply names none
}

// ParseStop parses a stop reply ("T05thread:01;..." or "S05"); "W"/"X"
// (the target exited) and anything else are errors.
func ParseStop(s string) (Stop, error) {
	if len(s) < 3 || (s[0] != 'T' && s[0] != 'S') {
		return Stop{}, fmt.Errorf("gdbstub: %.40q is not a stop reply", s)
	}
	sig, ok := hexByte(s[1], s[2])
	if !ok {
		return Stop{}, fmt.Errorf("gdbstub: stop reply %.40q: bad signal", s)
	}
	st := Stop{Signal: int(sig)}
	for kv := range strings.SplitSeq(s[3:], ";") {
		k, v, found := strings.Cut(kv, ":")
		if !found || k != "thread" {
			continue
		}
		id, err := ParseThread(v)
		if err != nil {
			return Stop{}, err
		}
		st.Thread = id
	}
	return st, nil
}

// ParseThread parses a thread id: "hex", or "pP.T" with the multiprocess
// extension (the thread part is the vCPU's).
func ParseThread(v string) (int, error) {
	if strings.HasPrefix(v, "p") {
		_, t, ok := strings.Cut(v, ".")
		if !ok {
			return 0, fmt.Errorf("gdbstub: thread id %.20q", v)
		}
		v = t
	}
	id, err := strconv.ParseUint(v, 16, 31)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("gdbstub: thread id %.20q", v)
	}
	return int(id), nil
}

// Halted asks why the target stopped (`?`).
func (c *Conn) Halted(ctx context.Context) (Stop, error) {
	reply, err := c.Command(ctx, "?")
	if err != nil {
		return Stop{}, err
	}
	return ParseStop(reply)
}

// Continue resumes every vCPU (`c`) without waiting.
func (c *Conn) Continue(ctx context.Context) error {
	c.ran()
	return c.send(ctx, "c")
}

// Step steps thread one instruction (`Hc`, `s`) without waiting; the
// other vCPUs run too. QEMU steps with interrupts and timers masked
// (SSTEP_NOIRQ|SSTEP_NOTIMER), and a step overrides breakpoints, which
// is how a thread leaves a breakpoint it is stopped at.
func (c *Conn) Step(ctx context.Context, thread int) error {
	if err := c.ok(ctx, fmt.Sprintf("Hc%x", thread)); err != nil {
		return err
	}
	c.ran()
	return c.send(ctx, "s")
}

// Wait waits for the stop reply after Continue or Step. When ctx ends
// first, the guest is interrupted (0x03) and the stop that answers is
// waited for a few seconds more; the error is then ctx's.
func (c *Conn) Wait(ctx context.Context) (Stop, error) {
	reply, err := c.recv(ctx)
	for err == nil && len(reply) > 1 && reply[0] == 'O' && reply != "OK" {
		// Console output ("O" hex) may come before the stop reply.
		reply, err = c.recv(ctx)
	}
	if err == nil {
		return ParseStop(reply)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		return Stop{}, err
	}
	if ierr := c.Interrupt(); ierr != nil {
		return Stop{}, fmt.Errorf("%w (and the interrupt failed: %v)", err, ierr)
	}
	return Stop{}, ctx.Err()
}

// Interrupt stops a running guest (0x03) and reads the stop that answers,
// within 5 seconds.
func (c *Conn) Interrupt() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c.deadline(ctx)
	if _, err := c.c.Write([]byte{0x03}); err != nil {
		return err
	}
	reply, err := c.recv(ctx)
	if err != nil {
		return err
	}
	_, err = ParseStop(reply)
	return err
}

// Breakpoint inserts (`Z1`) or removes (`z1`) a hardware breakpoint at
// the virtual address va. Under TCG QEMU checks it as it translates
// code: nothing is written to guest memory, and it matches in any
// address space (the caller filters on CR3).
func (c *Conn) Breakpoint(ctx context.Context, va uint64, insert bool) error {
	op := 'z'
	if insert {
		op = 'Z'
	}
	return c.ok(ctx, fmt.Sprintf("%c1,%x,1", op, va))
}

// ReadMemory reads n bytes at virtual address va through the current
// vCPU's page tables (`m`), n at most 4096.
func (c *Conn) ReadMemory(ctx context.Context, thread int, va uint64, n int) ([]byte, error) {
	if n <= 0 || n > 4096 {
		return nil, fmt.Errorf("gdbstub: read of %d bytes", n)
	}
	if err := c.selectThread(ctx, thread); err != nil {
		return nil, err
	}
	reply, err := c.Command(ctx, fmt.Sprintf("m%x,%x", va, n))
	if err != nil {
		return nil, fmt.Errorf("read %#x+%d: %w", va, n, err)
	}
	b, err := decodeHex([]byte(reply))
	if err != nil {
		return nil, err
	}
	if len(b) != n {
		return nil, fmt.Errorf("gdbstub: read %#x+%d: got %d bytes", va, n, len(b))
	}
	return b, nil
}

// selectThread makes thread the one `p`, `P` and `m` act on (`Hg`), its
// state current. Under KVM QEMU's vCPU state lives in KVM, and QEMU
// 7.2's gdbstub fetches it (cpu_synchronize_state) for `g` but not for
// `p`, `P` or `m`: without a `g` first, `p` returns the registers of the
// last time QEMU fetched them (seen: rip at the reset vector after a
// breakpoint stop at SeaBIOS's entry), `m` translates through that stale
// CR3, and a `P` lands in the stale copy, which QEMU puts back only once
// it has fetched the state (inferred from kvm_cpu_exec). So the first
// selection of a thread after each stop reads `g` (about 600 bytes of
// hex), which makes QEMU fetch the state and put it back, with any `P`,
// before the vCPU runs again. Under TCG it costs one packet.
func (c *Conn) selectThread(ctx context.Context, thread int) error {
	if err := c.ok(ctx, fmt.Sprintf("Hg%x", thread)); err != nil {
		return err
	}
	if c.synced[thread] {
		return nil
	}
	if _, err := c.Command(ctx, "g"); err != nil {
		return fmt.Errorf("gdbstub: fetch the state of thread %d: %w", thread, err)
	}
	c.synced[thread] = true
	return nil
}

// ran forgets which threads' states are current: the guest runs.
func (c *Conn) ran() { clear(c.synced) }

// Detach removes every breakpoint and resumes the guest (`D`).
func (c *Conn) Detach(ctx context.Context) error {
	c.ran()
	return c.ok(ctx, "D")
}
