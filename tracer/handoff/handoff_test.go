//go:build linux && amd64

package handoff

import (
	"context"
	"fmt"
	"net"
	"net/rpc"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/internal/tracetest"
	"github.com/kvmscope/kvmscope/tracer"
	"golang.org/x/sys/unix"
)

func init() { tracetest.Child() }

// keeperOf traces the tiny guest under KVM, serves it as a Keeper on one
// end of a socketpair and returns a Client on the other.
func keeperOf(t *testing.T) (*tracer.Tracer, *Client, net.Conn) {
	testenv.Require(t, testenv.QEMU, testenv.KVM)
	kernel, err := testguest.Build()
	if err != nil {
		t.Fatalf("build tiny guest: %v", err)
	}
	qemu, _ := exec.LookPath("qemu-system-x86_64")
	q := NewQueues()
	tr, err := tracetest.Start(qemu, append([]string{qemu}, testguest.KernelArgs(kernel, 2, "kvm", "")...), tracer.Options{Events: q, Blocked: q.Blocked})
	if err != nil {
		t.Fatalf("start QEMU under the tracer: %v", err)
	}
	t.Cleanup(func() {
		tr.Signal(unix.SIGKILL)
		<-tr.Done()
	})
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours, err := net.FileConn(os.NewFile(uintptr(fds[0]), "keeper"))
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := net.FileConn(os.NewFile(uintptr(fds[1]), "analysis"))
	if err != nil {
		t.Fatal(err)
	}
	go q.Keeper(tr).Serve(ours)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, theirs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return tr, c, theirs
}

// waitFor polls cond until it holds or 20 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// stoppedThreads counts the threads of pid in a stopped state.
func stoppedThreads(pid int) int {
	n := 0
	stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		s := string(b)
		if i := strings.LastIndexByte(s, ')'); i > 0 && i+2 < len(s) && (s[i+2] == 't' || s[i+2] == 'T') {
			n++
		}
	}
	return n
}

// TestClient: the analysis process's view through the socket follows the
// tracer's: vCPUs and memslots as the tracer captured them, fresh
// registers, a pause that stops QEMU and a resume that lets it go.
func TestClient(t *testing.T) {
	tr, c, _ := keeperOf(t)
	waitFor(t, "2 vCPUs and memslots through the socket", func() bool { return len(c.VCPUs()) == 2 && len(c.Memslots()) > 0 })
	if c.Pid() != tr.VM().Pid() || c.QEMUPid() != tr.QEMUPid() || c.KeeperPid() != os.Getpid() {
		t.Fatalf("pids: client %d/%d/%d, tracer %d/%d", c.Pid(), c.QEMUPid(), c.KeeperPid(), tr.VM().Pid(), tr.QEMUPid())
	}
	waitFor(t, "the memslot table through the socket", func() bool { return len(c.Memslots()) == len(tr.VM().Memslots()) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The boot vCPU reaches long mode (CR0.PE, EFER.LMA) within moments:
	// its registers come through the socket as the tracer copied them.
	var s tracer.Sample
	waitFor(t, "vCPU 0 in long mode, through the socket", func() bool {
		var err error
		s, err = c.Registers(ctx, 0)
		if err != nil {
			t.Fatalf("registers of vCPU 0: %v", err)
		}
		return s.ID == 0 && s.Regs.Sregs.CR0&1 != 0 && s.Regs.Sregs.EFER&(1<<10) != 0 && s.Regs.Regs.RIP != 0
	})
	if _, err := c.Registers(ctx, 7); err == nil || !strings.Contains(err.Error(), tracer.ErrNoVCPU.Error()) {
		t.Errorf("registers of a vCPU that does not exist: %v", err)
	}
	// The register board: the client kicks the vCPU itself and reads
	// the tracer's copy from shared memory, fresh.
	board, err := tracer.NewRegsBoard()
	if err != nil {
		t.Fatal(err)
	}
	defer board.Close()
	tr.VM().Publish(board)
	f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", board.File().Fd()))
	if err != nil {
		t.Fatal(err)
	}
	view, err := tracer.OpenRegsBoard(f)
	if err != nil {
		t.Fatal(err)
	}
	defer view.Close()
	smp, ok, err := view.Sample(ctx, tr.VM().Pid(), c.VCPUs()[0].TID, 0)
	if err != nil || !ok || !smp.Fresh || smp.Regs.Sregs.EFER&(1<<10) == 0 {
		t.Fatalf("a kick answered on the board: %v %+v (%v)", ok, smp, err)
	}
	c.UseBoard(view)
	before := s.At
	if s, err = c.Registers(ctx, 0); err != nil || !s.Fresh || !s.At.After(before) || s.Regs.Sregs.EFER&(1<<10) == 0 {
		t.Fatalf("registers of vCPU 0 from the board: %+v (%v)", s, err)
	}

	resume, err := c.Pause(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := stoppedThreads(c.QEMUPid()); n == 0 {
		t.Error("paused, and no QEMU thread is stopped")
	}
	// Paused, the vCPU cannot answer a kick: the registers are the ones
	// kvm_run holds, not fresh.
	if s, err := c.Registers(ctx, 0); err != nil || s.Fresh || s.Regs.Sregs.EFER&(1<<10) == 0 {
		t.Errorf("registers of a paused vCPU: %+v (%v)", s, err)
	}
	resume()
	waitFor(t, "QEMU to run on after resume", func() bool { return stoppedThreads(c.QEMUPid()) == 0 })
}

// TestHangUpReleasesPause: an analysis process that dies while it holds a
// pause does not leave QEMU stopped: the keeper resumes it when the socket
// closes.
func TestHangUpReleasesPause(t *testing.T) {
	_, c, conn := keeperOf(t)
	waitFor(t, "the vCPUs", func() bool { return len(c.VCPUs()) == 2 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	pid := c.QEMUPid()
	time.Sleep(200 * time.Millisecond)
	if stoppedThreads(pid) == 0 {
		t.Fatal("paused, and no QEMU thread is stopped")
	}
	// What the kernel does when the analysis process dies. Its Watch long
	// poll (10 s) is still in flight: the keeper must not wait for it.
	conn.Close()
	closed := time.Now()
	for stoppedThreads(pid) != 0 {
		if time.Since(closed) > 3*time.Second {
			t.Fatal("QEMU still stopped 3 s after the analysis side hung up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Error("the client did not see the hang-up")
	}
}

// TestRegsRoundTrip: registers cross the socket bit for bit (their binary
// form), and a short or long form is an error, not a panic.
func TestRegsRoundTrip(t *testing.T) {
	var s tracer.SyncRegs
	s.Regs.RIP, s.Regs.R15, s.Sregs.CR3, s.Sregs.CS.L, s.Sregs.IDT.Limit = 0xffffffff81000000, 7, 0x1234000, 1, 0xfff
	b, err := s.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var back tracer.SyncRegs
	if err := back.UnmarshalBinary(b); err != nil || back != s {
		t.Fatalf("round trip: %+v (%v)", back, err)
	}
	if err := back.UnmarshalBinary(b[1:]); err == nil {
		t.Error("a short form was taken")
	}
}

// TestEventsOutliveTheirTaker: an analysis process that took the tracer's
// events and died before it stored them does not lose them: the keeper
// hands them to the next one, which acknowledges them by asking again.
// Real net/rpc sessions on socketpairs; the queues need no QEMU.
func TestEventsOutliveTheirTaker(t *testing.T) {
	q := NewQueues()
	k := &Keeper{Queues: q}
	session := func() *rpc.Client {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		ours, _ := net.FileConn(os.NewFile(uintptr(fds[0]), "keeper"))
		theirs, _ := net.FileConn(os.NewFile(uintptr(fds[1]), "analysis"))
		go k.Serve(ours)
		c := rpc.NewClient(theirs)
		t.Cleanup(func() { c.Close() })
		return c
	}
	take := func(c *rpc.Client, ack uint64) Events {
		var r Events
		if err := c.Call("Keeper.TakeEvents", Take{Ack: ack}, &r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	q.Append("analysis_restart", map[string]int{"pid": 1})
	first := session()
	got := take(first, 0)
	if len(got.Events) != 1 || got.No == 0 {
		t.Fatalf("the first session took %+v", got)
	}
	first.Close() // dies before it stored them

	q.Append("analysis_restart", map[string]int{"pid": 2})
	next := session()
	again := take(next, 0)
	if len(again.Events) != 1 || again.No != got.No || string(again.Events[0].Fields) != `{"pid":1}` {
		t.Fatalf("the next session took %+v, want the batch the first one lost (%d)", again, got.No)
	}
	after := take(next, again.No)
	if len(after.Events) != 1 || after.No == again.No || string(after.Events[0].Fields) != `{"pid":2}` {
		t.Fatalf("after acknowledging, the next session took %+v, want only the newer event", after)
	}
}
